//! A bounded reader of GGUF version 3 files: metadata, tensor infos and tensor data.
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv x      (string:key u32:value_type value)
//! n_tensors x (string:name u32:n_dims n_dims x u64:dim u32:ggml_type u64:offset)
//! padding to `general.alignment` (default 32), then the tensor data
//! ```
//!
//! Strings are a u64 length and UTF-8 bytes; an array is a u32 element type, a u64 count
//! and the elements. Every count and length read from the file is checked against the
//! bytes left before anything is allocated for it, so a header that claims 2^60 tensors
//! is a [`ModelFileError::Truncated`], not an allocation; every tensor's data must lie
//! inside the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::ModelFileError;
use crate::quant::{self, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
/// Default alignment of the tensor data (`general.alignment` overrides it).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's most dimensions of a tensor.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays accepted (GGUF files in the wild use one level).
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value's GGUF type, in words (for errors).
    pub fn type_name(&self) -> String {
        match self {
            Value::U8(_) => "a u8".into(),
            Value::I8(_) => "an i8".into(),
            Value::U16(_) => "a u16".into(),
            Value::I16(_) => "an i16".into(),
            Value::U32(_) => "a u32".into(),
            Value::I32(_) => "an i32".into(),
            Value::U64(_) => "a u64".into(),
            Value::I64(_) => "an i64".into(),
            Value::F32(_) => "an f32".into(),
            Value::F64(_) => "an f64".into(),
            Value::Bool(_) => "a bool".into(),
            Value::String(_) => "a string".into(),
            Value::Array(a) => format!("an array of {}", a.len()),
        }
    }

    /// An integer value of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// A float or integer value as `f64`. An `f32` becomes the `f64` of its shortest
    /// decimal form, so `1e-5` written as `f32` reads as `1e-5`, as the model's
    /// `config.json` says, not as `9.99999974e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => x.to_string().parse().ok(),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF's dimensions, `ne0` (the contiguous one) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of values.
    pub n_values: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The row-major shape (`[ne1, ne0]` for a matrix: `[out, in]` for a linear layer).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file held in memory.
pub struct Gguf {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: usize,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A cursor over the file's bytes that turns every short read into a typed error.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], ModelFileError> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(ModelFileError::Truncated {
                path: self.path.to_owned(),
                what: what(),
                offset: self.at as u64,
                need: n,
                len: self.bytes.len() as u64,
            });
        }
        let start = self.at;
        self.at += n as usize;
        Ok(&self.bytes[start..self.at])
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> Result<[u8; N], ModelFileError> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, ModelFileError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, ModelFileError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, ModelFileError> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ModelFileError::malformed(self.path, format!("{} is not UTF-8", what())))
    }

    /// Fails unless `count` items of at least `min_bytes` each fit in what is left:
    /// called before allocating for `count` items.
    fn check_count(
        &self,
        count: u64,
        min_bytes: u64,
        what: &dyn Fn() -> String,
    ) -> Result<usize, ModelFileError> {
        let left = (self.bytes.len() - self.at) as u64;
        match count.checked_mul(min_bytes) {
            Some(need) if need <= left => Ok(count as usize),
            _ => Err(ModelFileError::Truncated {
                path: self.path.to_owned(),
                what: format!("{} ({count} items)", what()),
                offset: self.at as u64,
                need: count.saturating_mul(min_bytes),
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn value(
        &mut self,
        type_id: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<Value, ModelFileError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(ModelFileError::malformed(
                        self.path,
                        format!("{} is a bool of value {b}", what()),
                    ));
                }
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(ModelFileError::malformed(
                        self.path,
                        format!("{} nests arrays deeper than {MAX_ARRAY_DEPTH}", what()),
                    ));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                let min = min_value_bytes(elem).ok_or_else(|| {
                    ModelFileError::malformed(
                        self.path,
                        format!("{} has elements of unknown type {elem}", what()),
                    )
                })?;
                let count = self.check_count(count, min, what)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(ModelFileError::malformed(
                    self.path,
                    format!("{} has unknown value type {other}", what()),
                ));
            }
        })
    }
}

/// The fewest bytes a value of GGUF type `type_id` takes (`None`: unknown type).
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8..=12 => 8, // a string's or an array's header, or a 64-bit value
        _ => return None,
    })
}

impl Gguf {
    /// Reads and parses the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Gguf, ModelFileError> {
        let bytes = std::fs::read(path).map_err(|e| ModelFileError::io(path, e))?;
        Gguf::parse(path, bytes)
    }

    /// Parses a GGUF file's bytes; `path` names it in errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Gguf, ModelFileError> {
        let mut r = Reader {
            path,
            bytes: &bytes,
            at: 0,
        };
        let magic = r
            .take(4, &|| "the magic".into())
            .map_err(|_| ModelFileError::BadMagic {
                path: path.to_owned(),
                found: bytes.iter().take(4).copied().collect(),
            })?;
        if magic != MAGIC {
            return Err(ModelFileError::BadMagic {
                path: path.to_owned(),
                found: magic.to_vec(),
            });
        }
        let version = r.u32(&|| "the version".into())?;
        if version != 3 {
            return Err(ModelFileError::UnsupportedVersion {
                path: path.to_owned(),
                version,
            });
        }
        let n_tensors = r.u64(&|| "the tensor count".into())?;
        let n_kv = r.u64(&|| "the metadata count".into())?;
        // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
        let n_kv = r.check_count(n_kv, 13, &|| "the metadata".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&|| format!("metadata key {i}"))?;
            let what = || format!("metadata {key}");
            let type_id = r.u32(&what)?;
            let value = r.value(type_id, 0, &what)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(ModelFileError::malformed(
                    path,
                    format!("metadata {key} appears twice"),
                ));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(ModelFileError::MetadataType {
                    path: path.to_owned(),
                    key: "general.alignment".into(),
                    found: format!("{other:?}"),
                    expected: "a u32 power of two",
                });
            }
        };
        // A tensor info takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        let n_tensors = r.check_count(n_tensors, 24, &|| "the tensor infos".into())?;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&|| format!("tensor {i}'s name"))?;
            let what = || format!("tensor {name}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ModelFileError::malformed(
                    path,
                    format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&what)?);
            }
            let type_id = r.u32(&what)?;
            let offset = r.u64(&what)?;
            let ty =
                GgmlType::from_id(type_id).ok_or_else(|| ModelFileError::UnknownTensorType {
                    path: path.to_owned(),
                    name: name.clone(),
                    type_id,
                })?;
            let n_values = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    ModelFileError::malformed(
                        path,
                        format!("tensor {name} has dimensions {dims:?}"),
                    )
                })?;
            if !dims[0].is_multiple_of(ty.block_size() as u64) {
                return Err(ModelFileError::malformed(
                    path,
                    format!(
                        "tensor {name}'s rows of {} values are not whole {ty:?} blocks of {}",
                        dims[0],
                        ty.block_size()
                    ),
                ));
            }
            let n_bytes = ty.bytes_of(n_values).ok_or_else(|| {
                ModelFileError::malformed(path, format!("tensor {name} is too large"))
            })?;
            if !offset.is_multiple_of(alignment) {
                return Err(ModelFileError::malformed(
                    path,
                    format!(
                        "tensor {name}'s offset {offset} is not a multiple of the alignment {alignment}"
                    ),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(ModelFileError::malformed(
                    path,
                    format!("tensor {name} appears twice"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_values,
                n_bytes,
            });
        }
        let data_start = (r.at as u64).div_ceil(alignment) * alignment;
        let len = bytes.len() as u64;
        for t in &tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(ModelFileError::Truncated {
                        path: path.to_owned(),
                        what: format!("tensor {}'s data", t.name),
                        offset: data_start.saturating_add(t.offset),
                        need: t.n_bytes,
                        len,
                    });
                }
            }
        }
        Ok(Gguf {
            path: path.to_owned(),
            version,
            metadata,
            tensors,
            alignment,
            data_start: data_start as usize,
            bytes,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked to lie in the file when parsed).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        let start = self.data_start + tensor.offset as usize;
        &self.bytes[start..start + tensor.n_bytes as usize]
    }

    /// Dequantizes a tensor into `out`, which must hold exactly its values.
    pub fn dequantize_into(
        &self,
        tensor: &TensorInfo,
        out: &mut [f32],
    ) -> Result<(), ModelFileError> {
        if out.len() as u64 != tensor.n_values {
            return Err(ModelFileError::malformed(
                &self.path,
                format!(
                    "tensor {} has {} values, {} expected",
                    tensor.name,
                    tensor.n_values,
                    out.len()
                ),
            ));
        }
        quant::dequantize(tensor.ty, self.tensor_bytes(tensor), out);
        Ok(())
    }

    /// Metadata `key`, or a [`ModelFileError::MissingMetadata`].
    pub fn get(&self, key: &str) -> Result<&Value, ModelFileError> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelFileError::MissingMetadata {
                path: self.path.clone(),
                key: key.into(),
            })
    }

    fn type_error(&self, key: &str, found: &Value, expected: &'static str) -> ModelFileError {
        ModelFileError::MetadataType {
            path: self.path.clone(),
            key: key.into(),
            found: found.type_name(),
            expected,
        }
    }

    /// A non-negative integer of any width that fits a `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize, ModelFileError> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.type_error(key, v, "a non-negative integer"))
    }

    /// A number.
    pub fn get_f64(&self, key: &str) -> Result<f64, ModelFileError> {
        let v = self.get(key)?;
        v.as_f64()
            .ok_or_else(|| self.type_error(key, v, "a number"))
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<&str, ModelFileError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.type_error(key, v, "a string")),
        }
    }

    /// A bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, ModelFileError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.type_error(key, v, "a bool")),
        }
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, ModelFileError> {
        let v = self.get(key)?;
        let err = || self.type_error(key, v, "an array of strings");
        match v {
            Value::Array(items) => items
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(err()),
                })
                .collect(),
            _ => Err(err()),
        }
    }

    /// An array of integers.
    pub fn get_ints(&self, key: &str) -> Result<Vec<i64>, ModelFileError> {
        let v = self.get(key)?;
        let err = || self.type_error(key, v, "an array of integers");
        match v {
            Value::Array(items) => items
                .iter()
                .map(|x| match *x {
                    Value::I32(i) => Ok(i64::from(i)),
                    Value::I64(i) => Ok(i),
                    Value::I8(i) => Ok(i64::from(i)),
                    Value::I16(i) => Ok(i64::from(i)),
                    _ => x
                        .as_u64()
                        .and_then(|u| i64::try_from(u).ok())
                        .ok_or_else(err),
                })
                .collect(),
            _ => Err(err()),
        }
    }
}
