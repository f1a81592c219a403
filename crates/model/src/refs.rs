//! Typed object references: a `Ref<classes::VM>` names a VM and cannot be
//! passed where a `Ref<classes::VDI>` is wanted. On the wire both are the
//! same `OpaqueRef:…` string.

use crate::{ClassId, NULL_REF};
use std::marker::PhantomData;

/// A class of the datamodel, as a type (see [`classes`]).
pub trait Class {
    const ID: ClassId;
}

/// ```compile_fail
/// use corral_model::refs::{Ref, classes};
/// fn destroy_vdi(_: &Ref<classes::VDI>) {}
/// destroy_vdi(&Ref::<classes::VM>::new("OpaqueRef:x")); // a VM is not a VDI
/// ```
pub struct Ref<C> {
    raw: String,
    class: PhantomData<fn() -> C>,
}

impl<C> Ref<C> {
    pub fn new(raw: impl Into<String>) -> Ref<C> {
        Ref {
            raw: raw.into(),
            class: PhantomData,
        }
    }
    pub fn null() -> Ref<C> {
        Ref::new(NULL_REF)
    }
    pub fn is_null(&self) -> bool {
        self.raw == NULL_REF
    }
    pub fn as_str(&self) -> &str {
        &self.raw
    }
    pub fn into_string(self) -> String {
        self.raw
    }
}

// By hand: derives would ask the marker type for the same traits.
impl<C> Clone for Ref<C> {
    fn clone(&self) -> Self {
        Ref::new(self.raw.clone())
    }
}
impl<C> PartialEq for Ref<C> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl<C> Eq for Ref<C> {}
impl<C> std::hash::Hash for Ref<C> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.raw.hash(h)
    }
}
impl<C> std::fmt::Debug for Ref<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}
impl<C> std::fmt::Display for Ref<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}
impl<C> AsRef<str> for Ref<C> {
    fn as_ref(&self) -> &str {
        &self.raw
    }
}

include!(concat!(env!("OUT_DIR"), "/refs.rs"));
