//! The datamodel tables generated from the spec, and lookups over them.

use std::collections::HashMap;
use std::sync::OnceLock;

/// A field or parameter type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ty {
    String,
    Int,
    Float,
    Bool,
    DateTime,
    Ref(&'static str),
    Enum(&'static str),
    Set(&'static Ty),
    Map(&'static Ty, &'static Ty),
    Option(&'static Ty),
    Record(&'static str),
    Void,
    EventBatch,
}

/// Field qualifier: `RO` is set by the server, `Ctor` is given at creation
/// (StaticRO), `RW` has setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qual {
    RO,
    Ctor,
    RW,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Published,
    Deprecated,
    Prototype,
}

/// XenServer's RBAC roles, most privileged first. `Root` is the local
/// superuser (and unix-socket callers), above every role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Root,
    PoolAdmin,
    PoolOperator,
    VmPowerAdmin,
    VmAdmin,
    VmOperator,
    ReadOnly,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::PoolAdmin,
        Role::PoolOperator,
        Role::VmPowerAdmin,
        Role::VmAdmin,
        Role::VmOperator,
        Role::ReadOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::PoolAdmin => "pool-admin",
            Role::PoolOperator => "pool-operator",
            Role::VmPowerAdmin => "vm-power-admin",
            Role::VmAdmin => "vm-admin",
            Role::VmOperator => "vm-operator",
            Role::ReadOnly => "read-only",
        }
    }

    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(s))
    }

    /// Whether a session holding `self` may do what needs `required`.
    pub fn allows(self, required: Role) -> bool {
        self <= required
    }

    /// The roles that hold a permission needing `required`, as XAPI lists them.
    pub fn holders(required: Role) -> Vec<Role> {
        Role::ALL
            .into_iter()
            .filter(|r| r.allows(required))
            .collect()
    }

    pub fn description(self) -> &'static str {
        match self {
            Role::Root => "The local superuser",
            Role::PoolAdmin => {
                "The Pool Administrator role has full access to all features and settings"
            }
            Role::PoolOperator => "The Pool Operator role manages host- and pool-wide resources",
            Role::VmPowerAdmin => {
                "The VM Power Administrator role has full access to VM and template management"
            }
            Role::VmAdmin => "The VM Administrator role can manage VMs and templates",
            Role::VmOperator => "The VM Operator role can use VMs and interact with VM consoles",
            Role::ReadOnly => "The Read-Only role can log in with basic read-only access",
        }
    }
}

#[derive(Debug)]
pub struct EnumDef {
    pub name: &'static str,
    pub values: &'static [&'static str],
}

#[derive(Debug)]
pub struct FieldDef {
    pub name: &'static str,
    pub ty: Ty,
    pub qual: Qual,
    /// Default as written in the spec (`""`, `{}`, `false`, `OpaqueRef:NULL`…).
    pub default: Option<&'static str>,
    /// Role needed for `set_<field>`; `None` when the field has no setter.
    pub set_role: Option<Role>,
    /// Role needed for `add_to_`/`remove_from_` (maps) or `add_`/`remove_` (sets).
    pub ops_role: Option<Role>,
    pub lifecycle: Lifecycle,
    /// Stored but never exposed on the wire (password hashes).
    pub internal: bool,
    /// A Corral extension, not in XenAPI.
    pub extension: bool,
    /// A set derived from the children's pointer field: `(child class, child field)`.
    pub rel: Option<(&'static str, &'static str)>,
}

#[derive(Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub ty: Ty,
    /// Present for optional trailing parameters.
    pub default: Option<&'static str>,
}

#[derive(Debug)]
pub struct MessageDef {
    pub name: &'static str,
    pub params: &'static [ParamDef],
    pub result: Ty,
    pub role: Role,
    pub is_async: bool,
    pub lifecycle: Lifecycle,
    pub extension: bool,
    pub errors: &'static [&'static str],
}

#[derive(Debug)]
pub struct ClassDef {
    pub name: &'static str,
    /// Stored in the pool database (false for `event`).
    pub in_db: bool,
    /// Written to disk (false for sessions and tasks, as in XAPI).
    pub persist: bool,
    /// Produces events for `event.from`.
    pub events: bool,
    /// Has per-field `get_<field>` messages.
    pub getters: bool,
    /// Implicit class messages (`get_all`, `create`…) with their roles.
    pub implicit: &'static [(&'static str, Role)],
    pub fields: &'static [FieldDef],
    pub messages: &'static [MessageDef],
}

#[derive(Debug)]
pub struct ErrorDef {
    pub code: &'static str,
    pub params: &'static [&'static str],
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldId {
    pub class: ClassId,
    pub index: usize,
}

include!(concat!(env!("OUT_DIR"), "/datamodel.rs"));

struct Index {
    by_name: HashMap<&'static str, ClassId>,
    by_lower: HashMap<String, ClassId>,
    fields: Vec<HashMap<&'static str, usize>>,
    enums: HashMap<&'static str, &'static EnumDef>,
    errors: HashMap<&'static str, &'static ErrorDef>,
}

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| Index {
        by_name: CLASSES
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name, ClassId(i)))
            .collect(),
        by_lower: CLASSES
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.to_lowercase(), ClassId(i)))
            .collect(),
        fields: CLASSES
            .iter()
            .map(|c| {
                c.fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (f.name, i))
                    .collect()
            })
            .collect(),
        enums: ENUMS.iter().map(|e| (e.name, e)).collect(),
        errors: ERRORS.iter().map(|e| (e.code, e)).collect(),
    })
}

impl ClassId {
    pub fn def(self) -> &'static ClassDef {
        &CLASSES[self.0]
    }
    pub fn name(self) -> &'static str {
        CLASSES[self.0].name
    }
    /// Exact (case-sensitive) wire name.
    pub fn by_name(name: &str) -> Option<ClassId> {
        index().by_name.get(name).copied()
    }
    /// Case-insensitive, as event subscriptions use.
    pub fn by_lower_name(name: &str) -> Option<ClassId> {
        index().by_lower.get(&name.to_ascii_lowercase()).copied()
    }
    pub fn field(self, name: &str) -> Option<FieldId> {
        index().fields[self.0]
            .get(name)
            .map(|&index| FieldId { class: self, index })
    }
    pub fn all() -> impl Iterator<Item = ClassId> {
        (0..CLASSES.len()).map(ClassId)
    }
    pub fn implicit_role(self, message: &str) -> Option<Role> {
        self.def()
            .implicit
            .iter()
            .find(|(m, _)| *m == message)
            .map(|(_, r)| *r)
    }
    pub fn message(self, name: &str) -> Option<&'static MessageDef> {
        self.def().messages.iter().find(|m| m.name == name)
    }
}

impl FieldId {
    pub fn def(self) -> &'static FieldDef {
        &CLASSES[self.class.0].fields[self.index]
    }
}

pub fn enum_def(name: &str) -> Option<&'static EnumDef> {
    index().enums.get(name).copied()
}

pub fn error_def(code: &str) -> Option<&'static ErrorDef> {
    index().errors.get(code).copied()
}
