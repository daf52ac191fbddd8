use std::sync::Arc;

/// Element type of a device tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// A device-resident tensor: shared storage plus a shape. Cloning shares the storage;
/// [`Tensor::reshape`] is free. Storage is owned by the backend (`Backend::Storage`).
#[derive(Debug)]
pub struct Tensor<S> {
    pub storage: Arc<S>,
    shape: Vec<usize>,
    dtype: DType,
}

impl<S> Clone for Tensor<S> {
    fn clone(&self) -> Self {
        Tensor { storage: self.storage.clone(), shape: self.shape.clone(), dtype: self.dtype }
    }
}

impl<S> Tensor<S> {
    pub fn new(storage: Arc<S>, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor { storage, shape, dtype }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Size of the last dim (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Product of all dims but the last.
    pub fn rows(&self) -> usize {
        self.numel() / self.last_dim().max(1)
    }
    /// Same storage, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> crate::Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(crate::Error::Shape {
                op: "reshape",
                detail: format!("{:?} ({} elements) into {:?} ({n})", self.shape, self.numel(), shape),
            });
        }
        Ok(Tensor { storage: self.storage.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
}

/// Host data to upload.
#[derive(Debug, Clone, Copy)]
pub enum HostTensor<'a> {
    F32(&'a [f32], &'a [usize]),
    U32(&'a [u32], &'a [usize]),
}

/// Host data downloaded from a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

impl HostData {
    /// The f32 values (bf16 tensors download as f32).
    pub fn into_f32(self) -> crate::Result<Vec<f32>> {
        match self {
            HostData::F32(v) => Ok(v),
            HostData::U32(_) => {
                Err(crate::Error::Shape { op: "download", detail: "expected f32 data, got u32".into() })
            }
        }
    }
    pub fn into_u32(self) -> crate::Result<Vec<u32>> {
        match self {
            HostData::U32(v) => Ok(v),
            HostData::F32(_) => {
                Err(crate::Error::Shape { op: "download", detail: "expected u32 data, got f32".into() })
            }
        }
    }
}
