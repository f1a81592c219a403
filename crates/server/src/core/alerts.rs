//! Messages (alerts) raised by corrald.

use corral_db::Db;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, date, new_ref};

/// Creates an alert (`message` object).
pub fn create_message(
    db: &Db,
    name: &str,
    priority: i64,
    cls: &str,
    obj_uuid: &str,
    body: &str,
) -> Result<String, ApiError> {
    let r = new_ref();
    db.write(|t| {
        t.create(
            class::MESSAGE,
            &r,
            vec![
                (field::message::NAME.index, Value::str(name)),
                (field::message::PRIORITY.index, Value::Int(priority)),
                (field::message::CLS.index, Value::str(cls)),
                (field::message::OBJ_UUID.index, Value::str(obj_uuid)),
                (
                    field::message::TIMESTAMP.index,
                    Value::DateTime(date::now()),
                ),
                (field::message::BODY.index, Value::str(body)),
            ],
        )
    })
    .map_err(ApiError::from)?;
    Ok(r)
}
