//! Acting on data: commands to devices with a tracked fate, and alert rules over the readings.
//!
//! Beside the data path, not in it: [`commands`] takes requests from the Control API (and from
//! rule actions), keeps each command's fate in a durable log and hands it to the device through
//! the transport of the way the device is connected (sources hand their outbound half to it).
//! Rules read committed readings after the fact, so no acknowledgement ever waits on a rule.

pub mod commands;
pub mod rules;

/// Help texts of the commands' and alerts' metrics (the book lists them: docs/src/control.md).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "citygw_commands_total",
        "Commands entering each state, by transport and state"
    );
    describe_gauge!("citygw_commands_open", "Commands not final yet");
    describe_histogram!(
        "citygw_command_seconds",
        Unit::Seconds,
        "A command's creation to its final state, by transport and outcome"
    );
    describe_counter!(
        "citygw_command_results_refused_total",
        "Device answers to commands refused, by reason"
    );
    describe_counter!(
        "citygw_command_reports_late_total",
        "Reports for commands already final, by transport"
    );
    describe_counter!(
        "citygw_command_log_errors_total",
        "Command log writes that failed (retried)"
    );
    describe_counter!(
        "citygw_alerts_raised_total",
        "Alerts raised, by rule and severity"
    );
    describe_counter!(
        "citygw_alerts_cleared_total",
        "Alerts cleared, by rule, severity and who (rule, operator)"
    );
    describe_gauge!("citygw_alerts_active", "Alerts active now, by severity");
    describe_counter!(
        "citygw_rule_actions_total",
        "Commands of rule actions per target, by rule and outcome (sent, cooldown, failed)"
    );
    describe_counter!(
        "citygw_rules_readings_evaluated_total",
        "Readings the rule evaluator went through"
    );
    describe_counter!(
        "citygw_rules_feed_lagged_total",
        "Times the rule evaluator fell behind the feed and caught up from the store"
    );
    describe_counter!(
        "citygw_alert_log_errors_total",
        "Writes of alert state that failed (retried)"
    );
}
