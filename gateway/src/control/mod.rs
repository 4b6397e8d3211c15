//! Acting on data: commands to devices with a tracked fate, and alert rules over the readings.
//!
//! Beside the data path, not in it: [`commands`] takes requests from the Control API (and from
//! rule actions), keeps each command's fate in a durable log and hands it to the device through
//! the transport of the way the device is connected (sources hand their outbound half to it).
//! Rules read committed readings after the fact, so no acknowledgement ever waits on a rule.

pub mod commands;
pub mod rules;
