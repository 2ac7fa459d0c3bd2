//! Requests that fail on our side (the store, a blocking task): the error's response
//! carries its cause as a [`Failed`] extension, and [`report`], a middleware of the
//! site's and the IVR API's routers, logs and counts it as an [`ErrorEvent`] where the
//! metrics are. The client's answer never holds the cause.

use axum::extract::State;
use axum::response::Response;
use engine::error_event::ErrorEvent;
use engine::telemetry::Metrics;

/// The cause of a failed request, for [`report`].
#[derive(Clone)]
pub(crate) struct Failed(pub(crate) String);

/// What [`report`] raises a failure as, and where it counts it.
#[derive(Clone)]
pub(crate) struct Reporter {
    pub(crate) metrics: Metrics,
    pub(crate) event: ErrorEvent,
}

/// Logs and counts the failure a response carries, and takes it out of the response.
pub(crate) async fn report(State(reporter): State<Reporter>, mut response: Response) -> Response {
    if let Some(Failed(error)) = response.extensions_mut().remove::<Failed>() {
        engine::error_event!(reporter.metrics, reporter.event, %error, "request failed");
    }
    response
}
