//! Commands over LwM2M: a Write (PUT) or Execute (POST) on one resource of a registered client.

use crate::proto::{lwm2m_operation, Lwm2mOperation};
use crate::sources::coap::lwm2m::objects::Path;

/// Longest value or argument string.
const MAX_VALUE: usize = 1024;

/// Checks an operation before it is queued.
pub fn validate(op: &Lwm2mOperation) -> Result<(), String> {
    let path = Path::parse(&op.path).ok_or_else(|| {
        format!(
            "lwm2m path {:?}: /{{object}}/{{instance}}/{{resource}}, e.g. /3311/0/5850",
            op.path
        )
    })?;
    if op.value.len() > MAX_VALUE {
        return Err(format!(
            "lwm2m value: {} bytes, limit {MAX_VALUE}",
            op.value.len()
        ));
    }
    match lwm2m_operation::Kind::try_from(op.kind) {
        Ok(lwm2m_operation::Kind::Write) if op.value.is_empty() => {
            Err(format!("lwm2m write of {path} needs a value"))
        }
        Ok(lwm2m_operation::Kind::Write | lwm2m_operation::Kind::Execute) => Ok(()),
        _ => Err("lwm2m kind: WRITE or EXECUTE".into()),
    }
}
