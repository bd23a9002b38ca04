//! Typed tensors as Tether moves them around: a name, a shape and a flat row-major buffer of one
//! of the Open Inference Protocol datatypes. Owns the conversions to and from raw little-endian
//! bytes (the V2 binary extension and tract both speak them); never touches JSON or tract.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The Open Inference Protocol datatypes Tether supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Datatype {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    U8,
    #[serde(rename = "INT8")]
    I8,
    #[serde(rename = "INT32")]
    I32,
    #[serde(rename = "INT64")]
    I64,
    #[serde(rename = "FP16")]
    F16,
    #[serde(rename = "FP32")]
    F32,
}

impl Datatype {
    /// All supported datatypes, for messages and tests.
    pub const ALL: [Datatype; 7] = [
        Datatype::Bool,
        Datatype::U8,
        Datatype::I8,
        Datatype::I32,
        Datatype::I64,
        Datatype::F16,
        Datatype::F32,
    ];

    /// The V2 name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::U8 => "UINT8",
            Datatype::I8 => "INT8",
            Datatype::I32 => "INT32",
            Datatype::I64 => "INT64",
            Datatype::F16 => "FP16",
            Datatype::F32 => "FP32",
        }
    }

    /// Parses a V2 datatype name.
    pub fn parse(name: &str) -> Result<Datatype> {
        Datatype::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| ModelError::UnsupportedDatatype(name.to_owned()))
    }

    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            Datatype::Bool | Datatype::U8 | Datatype::I8 => 1,
            Datatype::F16 => 2,
            Datatype::I32 | Datatype::F32 => 4,
            Datatype::I64 => 8,
        }
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A flat, row-major tensor buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

macro_rules! for_each_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::F32($v) => $body,
        }
    };
}

impl TensorData {
    /// The datatype of the elements.
    pub fn datatype(&self) -> Datatype {
        match self {
            TensorData::Bool(_) => Datatype::Bool,
            TensorData::U8(_) => Datatype::U8,
            TensorData::I8(_) => Datatype::I8,
            TensorData::I32(_) => Datatype::I32,
            TensorData::I64(_) => Datatype::I64,
            TensorData::F16(_) => Datatype::F16,
            TensorData::F32(_) => Datatype::F32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        for_each_variant!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty buffer of the given datatype with room for `capacity` elements.
    pub fn with_capacity(datatype: Datatype, capacity: usize) -> TensorData {
        match datatype {
            Datatype::Bool => TensorData::Bool(Vec::with_capacity(capacity)),
            Datatype::U8 => TensorData::U8(Vec::with_capacity(capacity)),
            Datatype::I8 => TensorData::I8(Vec::with_capacity(capacity)),
            Datatype::I32 => TensorData::I32(Vec::with_capacity(capacity)),
            Datatype::I64 => TensorData::I64(Vec::with_capacity(capacity)),
            Datatype::F16 => TensorData::F16(Vec::with_capacity(capacity)),
            Datatype::F32 => TensorData::F32(Vec::with_capacity(capacity)),
        }
    }

    /// Appends `other`, which must have the same datatype (checked by the caller; a mismatch
    /// is reported, never a panic).
    pub fn extend_from(&mut self, other: &TensorData) -> std::result::Result<(), String> {
        match (self, other) {
            (TensorData::Bool(a), TensorData::Bool(b)) => a.extend_from_slice(b),
            (TensorData::U8(a), TensorData::U8(b)) => a.extend_from_slice(b),
            (TensorData::I8(a), TensorData::I8(b)) => a.extend_from_slice(b),
            (TensorData::I32(a), TensorData::I32(b)) => a.extend_from_slice(b),
            (TensorData::I64(a), TensorData::I64(b)) => a.extend_from_slice(b),
            (TensorData::F16(a), TensorData::F16(b)) => a.extend_from_slice(b),
            (TensorData::F32(a), TensorData::F32(b)) => a.extend_from_slice(b),
            (a, b) => {
                return Err(format!(
                    "cannot join {} with {}",
                    a.datatype(),
                    b.datatype()
                ));
            }
        }
        Ok(())
    }

    /// Elements `start..end` as a new buffer. The range must be in bounds (callers derive it
    /// from the shape they validated).
    pub fn slice(&self, start: usize, end: usize) -> TensorData {
        match self {
            TensorData::Bool(v) => TensorData::Bool(v[start..end].to_vec()),
            TensorData::U8(v) => TensorData::U8(v[start..end].to_vec()),
            TensorData::I8(v) => TensorData::I8(v[start..end].to_vec()),
            TensorData::I32(v) => TensorData::I32(v[start..end].to_vec()),
            TensorData::I64(v) => TensorData::I64(v[start..end].to_vec()),
            TensorData::F16(v) => TensorData::F16(v[start..end].to_vec()),
            TensorData::F32(v) => TensorData::F32(v[start..end].to_vec()),
        }
    }

    /// The elements as little-endian bytes (the V2 binary extension's layout and tract's).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() * self.datatype().size_of());
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            TensorData::U8(v) => out.extend_from_slice(v),
            TensorData::I8(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            TensorData::I32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            TensorData::I64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            TensorData::F16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
            TensorData::F32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        }
        out
    }

    /// Decodes little-endian bytes; the length must be a whole number of elements.
    pub fn from_le_bytes(datatype: Datatype, bytes: &[u8]) -> std::result::Result<Self, String> {
        let size = datatype.size_of();
        if !bytes.len().is_multiple_of(size) {
            return Err(format!(
                "{} bytes is not a whole number of {datatype} elements ({size} bytes each)",
                bytes.len()
            ));
        }
        fn chunks<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect()
        }
        Ok(match datatype {
            Datatype::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
            Datatype::U8 => TensorData::U8(bytes.to_vec()),
            Datatype::I8 => TensorData::I8(chunks(bytes, i8::from_le_bytes)),
            Datatype::I32 => TensorData::I32(chunks(bytes, i32::from_le_bytes)),
            Datatype::I64 => TensorData::I64(chunks(bytes, i64::from_le_bytes)),
            Datatype::F16 => TensorData::F16(chunks(bytes, half::f16::from_le_bytes)),
            Datatype::F32 => TensorData::F32(chunks(bytes, f32::from_le_bytes)),
        })
    }

    /// The elements widened to f64 (bools as 0/1), for comparisons and reports.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            TensorData::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            #[allow(clippy::cast_precision_loss)]
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }
}

/// A named tensor: shape plus flat row-major data. The constructor checks that they agree.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// A tensor whose data length matches its shape, or a [`ModelError::DataLength`].
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: TensorData) -> Result<Tensor> {
        let name = name.into();
        let expected = element_count(&name, &shape)?;
        if expected != data.len() {
            return Err(ModelError::DataLength {
                input: name,
                got: data.len(),
                expected,
                shape: format_shape(&shape),
            });
        }
        Ok(Tensor { name, shape, data })
    }

    /// A float tensor, for tests and tools.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        Tensor::new(name, shape, TensorData::F32(data))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn datatype(&self) -> Datatype {
        self.data.datatype()
    }

    /// Takes the buffer out.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// The float elements, if this is an FP32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The largest absolute difference between the elements of two tensors, widened to f64
    /// (for comparing outputs against goldens; compare the shapes first).
    pub fn max_abs_diff(&self, other: &Tensor) -> f64 {
        let (a, b) = (self.data.to_f64_vec(), other.data.to_f64_vec());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The same tensor under another name.
    pub fn renamed(mut self, name: impl Into<String>) -> Tensor {
        self.name = name.into();
        self
    }
}

/// Largest rank accepted from a request; real models stop well before.
pub const MAX_RANK: usize = 8;

/// Product of a shape, refusing overflow and ranks beyond [`MAX_RANK`].
pub fn element_count(name: &str, shape: &[usize]) -> Result<usize> {
    if shape.len() > MAX_RANK {
        return Err(ModelError::AbsurdShape {
            input: name.to_owned(),
            shape: format_shape(shape),
            reason: format!("rank {} exceeds the maximum of {MAX_RANK}", shape.len()),
        });
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ModelError::AbsurdShape {
            input: name.to_owned(),
            shape: format_shape(shape),
            reason: "the element count overflows".to_owned(),
        })
}

/// `[1, 8, 8]` style.
pub fn format_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", dims.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_datatype() {
        let cases = [
            TensorData::Bool(vec![true, false, true]),
            TensorData::U8(vec![0, 7, 255]),
            TensorData::I8(vec![-128, 0, 127]),
            TensorData::I32(vec![i32::MIN, 0, i32::MAX]),
            TensorData::I64(vec![i64::MIN, 1, i64::MAX]),
            TensorData::F16(vec![half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]),
            TensorData::F32(vec![0.25, -1e30, f32::MIN_POSITIVE]),
        ];
        for data in cases {
            let bytes = data.to_le_bytes();
            assert_eq!(bytes.len(), data.len() * data.datatype().size_of());
            let back = TensorData::from_le_bytes(data.datatype(), &bytes).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn partial_elements_are_refused() {
        let err = TensorData::from_le_bytes(Datatype::F32, &[0, 0, 0]).unwrap_err();
        assert!(
            err.contains("3 bytes is not a whole number of FP32"),
            "{err}"
        );
    }

    #[test]
    fn shape_and_data_must_agree() {
        let err = Tensor::from_f32("x", vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input `x` has 5 values in `data` but its shape [2,3] needs 6"
        );
    }

    #[test]
    fn overflowing_and_deep_shapes_are_absurd() {
        let err = element_count("x", &[usize::MAX, 2]).unwrap_err();
        assert!(matches!(err, ModelError::AbsurdShape { .. }), "{err}");
        let err = element_count("x", &[1; 9]).unwrap_err();
        assert!(
            err.to_string().contains("rank 9 exceeds the maximum of 8"),
            "{err}"
        );
    }

    #[test]
    fn datatype_names_round_trip() {
        for d in Datatype::ALL {
            assert_eq!(Datatype::parse(d.as_str()).unwrap(), d);
        }
        let err = Datatype::parse("FP64").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("datatype `FP64` is not supported"),
            "{err}"
        );
    }
}
