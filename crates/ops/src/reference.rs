//! The reference twin of every op: plain, single-threaded, obviously-correct Rust.
//! Weights are decoded with [`fp4moe_ops::HostWeight::row_f32`](crate::HostWeight::row_f32)
//! (the `fp4` crate's decode) and all math is f32. Fast backends are tested against this.
//!
//! [`HostStorage`] is also the storage of the fast CPU backend, which delegates the ops it does
//! not accelerate to the functions here.

use std::sync::RwLock;

/// Host memory behind a tensor of the reference and CPU backends.
#[derive(Debug)]
pub struct HostStorage(pub RwLock<HostBuf>);

/// Typed host buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum HostBuf {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    U32(Vec<u32>),
}

/// The reference backend (TODO: filled in by the reference/conformance work).
#[derive(Debug, Default, Clone)]
pub struct RefBackend;
