//! Extent-level overlay: apply a differencing disk's extents over its parent's, coalesce
//! chains, and turn extents into raw bytes (for tests and small disks).

use xenvault_types::{Extent, ExtentData};

use super::VhdError;

/// Iterator that lays `child` extents over `parent` extents: where the child has an
/// extent it wins, elsewhere the parent shows through. Both inputs must be in
/// increasing offset order without overlaps (a decoder's output is); the result is too.
/// Memory: one extent of each input.
#[derive(Debug)]
pub struct Overlay<P, C> {
    parent: P,
    child: C,
    p: Option<Extent>,
    c: Option<Extent>,
    p_end: u64,
    c_end: u64,
    covered: u64,
    failed: bool,
}

/// Lays `child` (a differencing disk's extents) over `parent`; see [`Overlay`].
pub fn overlay<P, C>(parent: P, child: C) -> Overlay<P::IntoIter, C::IntoIter>
where
    P: IntoIterator<Item = Extent>,
    C: IntoIterator<Item = Extent>,
{
    Overlay {
        parent: parent.into_iter(),
        child: child.into_iter(),
        p: None,
        c: None,
        p_end: 0,
        c_end: 0,
        covered: 0,
        failed: false,
    }
}

fn pull(
    it: &mut impl Iterator<Item = Extent>,
    end: &mut u64,
    which: &str,
) -> Result<Option<Extent>, VhdError> {
    for e in it.by_ref() {
        if e.is_empty() {
            continue;
        }
        if e.offset < *end {
            return Err(VhdError::InvalidInput(format!(
                "{which} extent at {} starts before the previous one ends ({})",
                e.offset, *end
            )));
        }
        *end = e.end();
        return Ok(Some(e));
    }
    Ok(None)
}

/// Splits an extent at absolute offset `at` (offset < at < end).
fn split(e: Extent, at: u64) -> (Extent, Extent) {
    let k = at - e.offset;
    match e.data {
        ExtentData::Zero(n) => (Extent::zero(e.offset, k), Extent::zero(at, n - k)),
        ExtentData::Data(mut d) => {
            let tail = d.split_off(k as usize);
            (Extent::data(e.offset, d), Extent::data(at, tail))
        }
    }
}

impl<P, C> Overlay<P, C>
where
    P: Iterator<Item = Extent>,
    C: Iterator<Item = Extent>,
{
    fn step(&mut self) -> Result<Option<Extent>, VhdError> {
        loop {
            if self.p.is_none() {
                self.p = pull(&mut self.parent, &mut self.p_end, "parent")?;
            }
            if self.c.is_none() {
                self.c = pull(&mut self.child, &mut self.c_end, "child")?;
            }
            // Drop what the child already covered.
            if let Some(p) = self.p.take() {
                if p.end() <= self.covered {
                    continue;
                }
                self.p = Some(if p.offset < self.covered {
                    split(p, self.covered).1
                } else {
                    p
                });
            }
            return Ok(match (self.p.take(), self.c.take()) {
                (None, None) => None,
                (Some(p), None) => Some(p),
                (None, Some(c)) => {
                    self.covered = c.end();
                    Some(c)
                }
                (Some(p), Some(c)) => {
                    if c.offset <= p.offset {
                        self.covered = c.end();
                        self.p = Some(p);
                        Some(c)
                    } else if p.end() <= c.offset {
                        self.c = Some(c);
                        Some(p)
                    } else {
                        let (head, tail) = split(p, c.offset);
                        self.p = Some(tail);
                        self.c = Some(c);
                        Some(head)
                    }
                }
            });
        }
    }
}

impl<P, C> Iterator for Overlay<P, C>
where
    P: Iterator<Item = Extent>,
    C: Iterator<Item = Extent>,
{
    type Item = Result<Extent, VhdError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(e) => e.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Coalesces a chain of layers, base first: each layer is laid over the result of
/// the ones before it.
pub fn coalesce(chain: Vec<Vec<Extent>>) -> Result<Vec<Extent>, VhdError> {
    let mut layers = chain.into_iter();
    let mut acc = layers.next().unwrap_or_default();
    for layer in layers {
        acc = overlay(acc, layer).collect::<Result<Vec<_>, _>>()?;
    }
    Ok(acc)
}

/// Writes extents into a zero-filled buffer of `size` bytes (gaps stay zero).
pub fn materialize(extents: &[Extent], size: u64) -> Result<Vec<u8>, VhdError> {
    let size_usize = usize::try_from(size)
        .map_err(|_| VhdError::InvalidInput(format!("{size} bytes do not fit in memory")))?;
    let mut out = vec![0u8; size_usize];
    for e in extents {
        if e.end() > size {
            return Err(VhdError::InvalidInput(format!(
                "extent {}..{} lies past the end ({size})",
                e.offset,
                e.end()
            )));
        }
        match &e.data {
            ExtentData::Data(d) => {
                out[e.offset as usize..e.end() as usize].copy_from_slice(d);
            }
            ExtentData::Zero(_) => out[e.offset as usize..e.end() as usize].fill(0),
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn child_wins_and_parent_shows_through() {
        let parent = vec![Extent::data(0, vec![1; 10]), Extent::zero(10, 10)];
        let child = vec![
            Extent::data(4, vec![2; 2]),
            Extent::zero(8, 4),
            Extent::data(15, vec![3]),
        ];
        let out: Vec<Extent> = overlay(parent, child).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            materialize(&out, 20).unwrap(),
            [1, 1, 1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0]
        );
        let mut end = 0;
        for e in &out {
            assert!(e.offset >= end);
            end = e.end();
        }
        assert_eq!(end, 20);
    }

    #[test]
    fn out_of_order_input_is_an_error() {
        let parent = vec![Extent::zero(10, 5), Extent::zero(0, 5)];
        let r: Result<Vec<_>, _> = overlay(parent, Vec::new()).collect();
        assert!(r.is_err());
    }

    #[test]
    fn coalesce_chain() {
        let base = vec![Extent::data(0, vec![1; 4])];
        let d1 = vec![Extent::data(1, vec![2])];
        let d2 = vec![Extent::data(2, vec![3; 2])];
        let out = coalesce(vec![base, d1, d2]).unwrap();
        assert_eq!(materialize(&out, 4).unwrap(), [1, 2, 3, 3]);
    }
}
