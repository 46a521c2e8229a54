//! The `get_all_records_where` expression language: `field "<db name>" =
//! "<literal>"`, `and`, `or`, `not`, parentheses, `true`, `false`, as in
//! xen-api's `ocaml/database/db_filter_lex.mll` and `db_filter_parse.mly`.

use crate::error::{ApiError, ApiResult};

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `field "name"`: the DB column.
    Field(String),
    /// `"literal"`.
    Literal(String),
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `true`.
    True,
    /// `false`.
    False,
    /// `a = b`.
    Eq(Operand, Operand),
    /// `not e`.
    Not(Box<Expr>),
    /// `a and b`.
    And(Box<Expr>, Box<Expr>),
    /// `a or b`.
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field,
    Str(String),
    Eq,
    And,
    Or,
    Not,
    LParen,
    RParen,
    True,
    False,
}

fn syntax(expr: &str) -> ApiError {
    ApiError::internal(format!("Db_filter.Expression_error (\"{expr}\")"))
}

fn lex(s: &str) -> ApiResult<Vec<Tok>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'=' => {
                out.push(Tok::Eq);
                i += 1;
            }
            b'(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            b')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            b'"' => {
                let end = s[i + 1..].find('"').ok_or_else(|| syntax(s))?;
                out.push(Tok::Str(s[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(match &s[start..i] {
                    "field" => Tok::Field,
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "true" => Tok::True,
                    "false" => Tok::False,
                    _ => return Err(syntax(s)),
                });
            }
            _ => return Err(syntax(s)),
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn or(&mut self) -> ApiResult<Expr> {
        let mut e = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> ApiResult<Expr> {
        let mut e = self.unary()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }
    fn unary(&mut self) -> ApiResult<Expr> {
        match self.peek() {
            Some(Tok::Not) => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let e = self.or()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err(syntax(self.src)),
                }
            }
            Some(Tok::True) => {
                self.pos += 1;
                Ok(Expr::True)
            }
            Some(Tok::False) => {
                self.pos += 1;
                Ok(Expr::False)
            }
            _ => {
                let a = self.operand()?;
                match self.next() {
                    Some(Tok::Eq) => {}
                    _ => return Err(syntax(self.src)),
                }
                let b = self.operand()?;
                Ok(Expr::Eq(a, b))
            }
        }
    }
    fn operand(&mut self) -> ApiResult<Operand> {
        match self.next() {
            Some(Tok::Field) => match self.next() {
                Some(Tok::Str(s)) => Ok(Operand::Field(s)),
                _ => Err(syntax(self.src)),
            },
            Some(Tok::Str(s)) => Ok(Operand::Literal(s)),
            _ => Err(syntax(self.src)),
        }
    }
}

/// Parses an expression.
pub fn parse(s: &str) -> ApiResult<Expr> {
    let mut p = Parser {
        toks: lex(s)?,
        pos: 0,
        src: s,
    };
    let e = p.or()?;
    if p.pos != p.toks.len() {
        return Err(syntax(s));
    }
    Ok(e)
}

impl Expr {
    /// Evaluates against a record, `field(db_name)` giving the DB string.
    pub fn eval(&self, field: &dyn Fn(&str) -> ApiResult<String>) -> ApiResult<bool> {
        let val = |o: &Operand| -> ApiResult<String> {
            match o {
                Operand::Field(f) => field(f),
                Operand::Literal(l) => Ok(l.clone()),
            }
        };
        Ok(match self {
            Expr::True => true,
            Expr::False => false,
            Expr::Eq(a, b) => val(a)? == val(b)?,
            Expr::Not(e) => !e.eval(field)?,
            Expr::And(a, b) => a.eval(field)? && b.eval(field)?,
            Expr::Or(a, b) => a.eval(field)? || b.eval(field)?,
        })
    }

    /// Fails on the first field name `known` rejects.
    pub fn check_fields(&self, known: &dyn Fn(&str) -> bool, class: &str) -> ApiResult<()> {
        let op = |o: &Operand| -> ApiResult<()> {
            match o {
                Operand::Field(f) if !known(f) => Err(ApiError::internal(format!(
                    "Db_exn.DBCache_NotFound(\"missing field\", \"{f}\", \"{class}\")"
                ))),
                _ => Ok(()),
            }
        };
        match self {
            Expr::True | Expr::False => Ok(()),
            Expr::Eq(a, b) => {
                op(a)?;
                op(b)
            }
            Expr::Not(e) => e.check_fields(known, class),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.check_fields(known, class)?;
                b.check_fields(known, class)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert_eq!(
            parse(r#"field "a"="1" or not (field "b" = "x" and true)"#).unwrap(),
            Expr::Or(
                Box::new(Expr::Eq(
                    Operand::Field("a".into()),
                    Operand::Literal("1".into())
                )),
                Box::new(Expr::Not(Box::new(Expr::And(
                    Box::new(Expr::Eq(
                        Operand::Field("b".into()),
                        Operand::Literal("x".into())
                    )),
                    Box::new(Expr::True)
                ))))
            )
        );
        for bad in ["field", "field \"a\" =", "(true", "\"x", "foo", "true true"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
