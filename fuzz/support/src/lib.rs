//! What the fuzz targets share: every decoded parameter is coerced to the
//! collection types the dispatcher coerces to.
use corral_model::Value;
use corral_model::schema::Ty;
use corral_model::value::coerce;

pub fn coerce_all(params: Vec<Value>) {
    static SET: Ty = Ty::Set(&Ty::String);
    static MAP: Ty = Ty::Map(&Ty::String, &Ty::String);
    for p in params {
        let _ = coerce(p.clone(), &SET, "p");
        let _ = coerce(p.clone(), &MAP, "p");
        let _ = coerce(p, &Ty::Int, "p");
    }
}
