//! `xenvault`: back up Xen virtual machines.
fn main() {}
