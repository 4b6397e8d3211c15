//! `citygw.v1.Control`: commands to devices, for the operator (admin token: any device) and for
//! agencies holding the `control` permission (their scope only).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::auth::check_token;
use crate::control::commands::{Commands, SendError};
use crate::control::rules::{is_active, parse_definition, AlertError, Alerts, RuleError};
use crate::proto::control_server::Control;
use crate::proto::*;
use crate::registry::agencies::{Agencies, Agency};
use crate::registry::secret::constant_time_eq;
use crate::registry::Registry;
use crate::store::StoreError;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;
/// Changes a slow watcher may have queued before its stream ends.
const WATCH_BUFFER: usize = 1024;

/// Who is calling: the operator, or an agency.
#[derive(Clone)]
pub enum Caller {
    Admin,
    Agency(Arc<Agency>),
}

impl Caller {
    /// The audit name of the caller.
    pub fn by(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Agency(a) => format!("agency:{}", a.name),
        }
    }

    /// Whether the caller sees a device of this tenant and kind.
    pub fn sees(&self, tenant: &str, kind: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Agency(a) => a.in_scope(tenant, kind),
        }
    }

    /// Refuses an agency without the `control` permission.
    pub fn may_control(&self) -> Result<(), Status> {
        match self {
            Caller::Agency(a) if !a.control => {
                metrics::counter!("citygw_api_denied_total", "api" => "control").increment(1);
                Err(Status::permission_denied(format!(
                    "agency {:?} has no control permission",
                    a.name
                )))
            }
            _ => Ok(()),
        }
    }

    /// Refuses every caller but the admin (changing the rules is the operator's).
    pub fn must_be_admin(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Agency(a) => {
                metrics::counter!("citygw_api_denied_total", "api" => "control").increment(1);
                Err(Status::permission_denied(format!(
                    "agency {:?} cannot {what}: the admin token only",
                    a.name
                )))
            }
        }
    }

    /// The refusal for a device (or a command of one) outside the caller's scope; unknown ones
    /// get the same answer, so an agency cannot probe for ids.
    pub fn out_of_scope(&self, what: &str) -> Status {
        metrics::counter!("citygw_api_denied_total", "api" => "control").increment(1);
        match self {
            Caller::Admin => Status::not_found(format!("{what} not found")),
            Caller::Agency(a) => {
                Status::permission_denied(format!("{what} is outside agency {:?}'s scope", a.name))
            }
        }
    }
}

/// Accepts the admin token or an agency token and puts the [`Caller`] on the request.
#[derive(Clone)]
pub struct ControlAuth {
    pub admin_token: Arc<str>,
    pub agencies: Agencies,
    /// For the back-off of failed tokens.
    pub registry: Registry,
}

impl tonic::service::Interceptor for ControlAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = check_token(
            &request,
            "control",
            "unknown token",
            &self.registry,
            |token| {
                if constant_time_eq(token.as_bytes(), self.admin_token.as_bytes()) {
                    Some(Caller::Admin)
                } else {
                    self.agencies.authenticate(token).map(Caller::Agency)
                }
            },
        )?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no caller on this call"))
}

pub struct ControlService {
    pub commands: Commands,
    pub alerts: Alerts,
    pub registry: Registry,
}

fn alert_status(e: AlertError) -> Status {
    match e {
        AlertError::NotFound(id) => Status::not_found(format!("alert {id:?} not found")),
        AlertError::Store(e) => store_status(e),
    }
}

fn rule_status(e: RuleError) -> Status {
    match e {
        RuleError::Invalid(m) => Status::invalid_argument(m),
        e @ RuleError::Exists(..) => Status::already_exists(e.to_string()),
        e @ RuleError::FromConfig(_) => Status::failed_precondition(e.to_string()),
        e @ RuleError::NotFound(_) => Status::not_found(e.to_string()),
        RuleError::Store(e) => store_status(e),
    }
}

fn page(limit: u32) -> usize {
    match limit as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "store error in control api");
    Status::unavailable(format!("store: {e}"))
}

type Watch<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn send_command(
        &self,
        req: Request<SendCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let r = req.into_inner();
        let what = format!("device {:?}", r.device_id);
        match self.registry.get(&r.device_id) {
            Some(d) if caller.sees(d.tenant(), d.kind()) => {}
            _ => return Err(caller.out_of_scope(&what)),
        }
        match self.commands.send(r, &caller.by()).await {
            Ok(c) => Ok(Response::new(c)),
            Err(e @ SendError::UnknownDevice(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (SendError::DisabledDevice(_) | SendError::Unroutable(_))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e @ SendError::Invalid(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(SendError::Store(e)) => Err(store_status(e)),
        }
    }

    async fn get_command(
        &self,
        req: Request<GetCommandRequest>,
    ) -> Result<Response<Command>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let id = req.into_inner().id;
        match self.commands.get(&id).map_err(store_status)? {
            Some(c) if caller.sees(&c.tenant, &c.kind) => Ok(Response::new(c)),
            _ => Err(caller.out_of_scope(&format!("command {id:?}"))),
        }
    }

    async fn list_commands(
        &self,
        req: Request<ListCommandsRequest>,
    ) -> Result<Response<ListCommandsResponse>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let r = req.into_inner();
        let commands = self.commands.clone();
        // The log is read from disk: off the async threads.
        let listed = tokio::task::spawn_blocking(move || {
            commands.list(&r.before_id, page(r.limit), |c| {
                caller.sees(&c.tenant, &c.kind)
                    && (r.device_id.is_empty() || c.device_id == r.device_id)
                    && (r.state == 0 || c.state == r.state)
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(ListCommandsResponse { commands: listed }))
    }

    type WatchCommandsStream = Watch<Command>;

    async fn watch_commands(
        &self,
        req: Request<WatchCommandsRequest>,
    ) -> Result<Response<Self::WatchCommandsStream>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let r = req.into_inner();
        for id in &r.device_ids {
            match self.registry.get(id) {
                Some(d) if caller.sees(d.tenant(), d.kind()) => {}
                _ => return Err(caller.out_of_scope(&format!("device {id:?}"))),
            }
        }
        let keep = move |c: &Command| {
            caller.sees(&c.tenant, &c.kind)
                && (r.device_ids.is_empty() || r.device_ids.contains(&c.device_id))
                && (r.states.is_empty() || r.states.contains(&c.state))
        };
        Ok(Response::new(watch(self.commands.watch(), keep)))
    }

    async fn list_alerts(
        &self,
        req: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let alerts = self.alerts.clone();
        let listed = tokio::task::spawn_blocking(move || {
            alerts.list(&r.before_id, page(r.limit), |a| {
                caller.sees(&a.tenant, &a.kind)
                    && (r.device_id.is_empty() || a.device_id == r.device_id)
                    && (r.rule.is_empty() || a.rule == r.rule)
                    && (r.state == 0 || a.state == r.state)
                    && (!r.active_only || is_active(a))
                    && (r.severity == 0 || a.severity == r.severity)
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(store_status)?;
        Ok(Response::new(ListAlertsResponse { alerts: listed }))
    }

    async fn get_alert(&self, req: Request<GetAlertRequest>) -> Result<Response<Alert>, Status> {
        let caller = caller(&req)?;
        let id = req.into_inner().id;
        Ok(Response::new(self.alert_in_scope(&caller, &id).await?))
    }

    async fn ack_alert(&self, req: Request<AckAlertRequest>) -> Result<Response<Alert>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let id = req.into_inner().id;
        self.alert_in_scope(&caller, &id).await?;
        let changed = self.alerts.ack(&id, &caller.by()).await;
        Ok(Response::new(changed.map_err(alert_status)?))
    }

    async fn clear_alert(
        &self,
        req: Request<ClearAlertRequest>,
    ) -> Result<Response<Alert>, Status> {
        let caller = caller(&req)?;
        caller.may_control()?;
        let id = req.into_inner().id;
        self.alert_in_scope(&caller, &id).await?;
        let changed = self.alerts.clear(&id, &caller.by()).await;
        Ok(Response::new(changed.map_err(alert_status)?))
    }

    type WatchAlertsStream = Watch<Alert>;

    async fn watch_alerts(
        &self,
        req: Request<WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        // Severities run from CRITICAL (1) to WARNING (4): "at least MAJOR" is 1..=2.
        let worst = match r.min_severity {
            0 => i32::MAX,
            s => s,
        };
        let keep = move |a: &Alert| {
            caller.sees(&a.tenant, &a.kind)
                && (r.device_ids.is_empty() || r.device_ids.contains(&a.device_id))
                && a.severity <= worst
        };
        Ok(Response::new(watch(self.alerts.watch(), keep)))
    }

    async fn list_rules(
        &self,
        req: Request<ListRulesRequest>,
    ) -> Result<Response<ListRulesResponse>, Status> {
        caller(&req)?;
        let rules = self.alerts.rule_list().await;
        Ok(Response::new(ListRulesResponse { rules }))
    }

    async fn add_rule(&self, req: Request<AddRuleRequest>) -> Result<Response<Rule>, Status> {
        let caller = caller(&req)?;
        caller.must_be_admin("add rules")?;
        let definition = parse_definition(&req.into_inner().definition).map_err(rule_status)?;
        let added = self.alerts.add_rule(definition, &caller.by()).await;
        Ok(Response::new(added.map_err(rule_status)?))
    }

    async fn remove_rule(
        &self,
        req: Request<RemoveRuleRequest>,
    ) -> Result<Response<RemoveRuleResponse>, Status> {
        let caller = caller(&req)?;
        caller.must_be_admin("remove rules")?;
        let name = req.into_inner().name;
        let (rule, alerts_cleared) = self
            .alerts
            .remove_rule(&name, &caller.by())
            .await
            .map_err(rule_status)?;
        Ok(Response::new(RemoveRuleResponse {
            rule: Some(rule),
            alerts_cleared,
        }))
    }
}

impl ControlService {
    /// The alert if the caller sees it; one outside the scope and an unknown one get the same
    /// refusal from an agency.
    async fn alert_in_scope(&self, caller: &Caller, id: &str) -> Result<Alert, Status> {
        match self.alerts.get(id).await.map_err(store_status)? {
            Some(a) if caller.sees(&a.tenant, &a.kind) => Ok(a),
            _ => Err(caller.out_of_scope(&format!("alert {id:?}"))),
        }
    }
}

/// A stream of the broadcast's items that `keep` accepts. A watcher too slow for the buffer gets
/// RESOURCE_EXHAUSTED (and watches again, reading the current state by Get or List).
pub fn watch<T: Clone + Send + Sync + 'static>(
    mut rx: tokio::sync::broadcast::Receiver<Arc<T>>,
    keep: impl Fn(&T) -> bool + Send + 'static,
) -> Watch<T> {
    let (tx, out) = tokio::sync::mpsc::channel(WATCH_BUFFER);
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let item = tokio::select! {
                r = rx.recv() => r,
                _ = tx.closed() => return,
            };
            match item {
                Ok(item) if keep(&item) => {
                    if tx.try_send(Ok((*item).clone())).is_err() {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(
                                "watcher too slow: changes were dropped; watch again",
                            )))
                            .await;
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "watcher too slow: {n} changes were dropped; watch again"
                        ))))
                        .await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}
