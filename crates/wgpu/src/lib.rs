//! wgpu backend (skeleton).
