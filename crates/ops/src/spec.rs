use serde::{Deserialize, Serialize};

/// Which implementation of `linear` to run. `Auto` lets the backend choose from its
/// [`KernelConfig`]; the others are called explicitly by the conformance suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearPath {
    Auto,
    /// Few rows: a GEMV per row, reading each weight once per row.
    Decode,
    /// Many rows: a GEMM tiled over `n_tile` output columns.
    Prefill {
        n_tile: usize,
    },
}

/// Which implementation of `moe` to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MoePath {
    Auto,
    /// Per (token, slot): GEMV against the chosen expert.
    Decode,
    /// Tokens sorted by expert (counts -> offsets -> permutation), a GEMM per expert tiled over
    /// `n_tile` columns, then a deterministic combine in slot order.
    Prefill {
        n_tile: usize,
    },
}

/// Tile choices as data: the one place a backend's `Auto` dispatch reads its launch shapes from.
/// Defaults are checked in; `fp4moe autotune` writes tuned JSON per device and model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KernelConfig {
    /// `linear` with at most this many rows takes the decode path.
    pub linear_decode_max_rows: usize,
    /// N tile of the prefill GEMM.
    pub linear_n_tile: usize,
    /// `moe` with at most this many tokens takes the decode path.
    pub moe_decode_max_tokens: usize,
    /// N tile of the grouped MoE GEMM.
    pub moe_n_tile: usize,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            linear_decode_max_rows: 4,
            linear_n_tile: 64,
            moe_decode_max_tokens: 4,
            moe_n_tile: 64,
        }
    }
}

impl KernelConfig {
    pub fn linear_path(&self, rows: usize) -> LinearPath {
        if rows <= self.linear_decode_max_rows {
            LinearPath::Decode
        } else {
            LinearPath::Prefill { n_tile: self.linear_n_tile }
        }
    }
    pub fn moe_path(&self, tokens: usize) -> MoePath {
        if tokens <= self.moe_decode_max_tokens {
            MoePath::Decode
        } else {
            MoePath::Prefill { n_tile: self.moe_n_tile }
        }
    }
}

/// See [`crate::Backend::head_linear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLinear {
    pub heads: usize,
    pub rows_per_head: usize,
    pub row_start: usize,
    pub row_count: usize,
    pub transpose: bool,
}

/// How rotary pairs are formed within the roped range `[offset, offset + dims)` of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// NeoX / rotate-half (Qwen3): dim i pairs with i + dims/2, frequency index i.
    NeoX,
    /// GPT-J interleaved (GLM-4.7-Flash): dims 2i and 2i+1 pair, frequency index i.
    Interleaved,
}

/// Rotary embedding: pair with frequency index i (0 ≤ i < dims/2) rotates by
/// `pos * theta^(-2i/dims)`: `(a, b) -> (a cos - b sin, b cos + a sin)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    pub offset: usize,
    pub dims: usize,
    pub theta: f32,
}

/// See [`crate::Backend::route_sigmoid_grouped`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupedRouter {
    pub k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub renormalize: bool,
    pub scale: f32,
}
