//! What every request passes through before its route, as one tower layer
//! ([`EveryRequestLayer`]): its timing ([`metrics::Timing`]), on the
//! service's router also its span ([`spans::start`]) and the security
//! headers of its answer ([`ui::security_headers`]), in that order,
//! outermost first.
//!
//! A hand-written layer rather than `axum::middleware::from_fn`: a
//! `from_fn` middleware allocates its future per request, with a copy of
//! the request's head in every nested `async fn`, plus a boxed hand-over to
//! the next, and all of it lives as long as the request. The filter's long
//! poll lasts as long as its request is held, thousands at once (issue #17:
//! held capacity), so this future keeps only what it needs after the
//! request has gone on (the route's name, the start time, the span) inside
//! the future of the route it wraps, without an allocation of its own.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use axum::extract::Request;
use axum::response::Response;
use opentelemetry::context::{FutureExt, WithContext};
use opentelemetry::Context;
use tower::{Layer, Service};

use super::{metrics, spans, ui};
use crate::state::AppState;

/// The layer: with `traced`, the span and the security headers too (the
/// service's router); without, the timing only (`filter_listen`'s).
#[derive(Clone)]
pub struct EveryRequestLayer {
    state: AppState,
    traced: bool,
}

impl EveryRequestLayer {
    /// Timing, span and security headers: the service's router.
    pub fn traced(state: AppState) -> EveryRequestLayer {
        EveryRequestLayer {
            state,
            traced: true,
        }
    }

    /// Timing only: the filter API alone on `filter_listen`.
    pub fn timed(state: AppState) -> EveryRequestLayer {
        EveryRequestLayer {
            state,
            traced: false,
        }
    }
}

impl<S> Layer<S> for EveryRequestLayer {
    type Service = EveryRequest<S>;

    fn layer(&self, inner: S) -> EveryRequest<S> {
        EveryRequest {
            inner,
            layer: self.clone(),
        }
    }
}

/// [`EveryRequestLayer`] around the route's service `S`.
#[derive(Clone)]
pub struct EveryRequest<S> {
    inner: S,
    layer: EveryRequestLayer,
}

impl<S> Service<Request> for EveryRequest<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
    // Polled in place (axum's routes answer with a boxed future): the
    // point is not to allocate one more.
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EveryResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was polled ready handles this request; a clone
        // stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let timing = metrics::Timing::start(&request);
        let span = match self.layer.traced {
            true => spans::start(&request),
            false => None,
        };
        let route = match &span {
            // The handler runs in its span (its notes go there).
            Some(cx) => Route::Traced(inner.call(request).with_context(cx.clone())),
            None => Route::Plain(inner.call(request)),
        };
        EveryResponse {
            route,
            span,
            timing: Some(timing),
            state: self.layer.state.clone(),
            traced: self.layer.traced,
        }
    }
}

/// The route's future, in its span when the request has one.
enum Route<F> {
    Plain(F),
    Traced(WithContext<F>),
}

/// The future of [`EveryRequest`]: the route's, then what comes after it.
/// Dropped before the answer (the client went away), it drops the span,
/// which ends it, and times nothing, as the middlewares it replaces did.
pub struct EveryResponse<F> {
    route: Route<F>,
    /// The request's span, which `route` runs in.
    span: Option<Context>,
    /// Taken once the answer is there.
    timing: Option<metrics::Timing>,
    state: AppState,
    traced: bool,
}

impl<F> Future for EveryResponse<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let answer = match &mut this.route {
            Route::Plain(f) => Pin::new(f).poll(cx),
            Route::Traced(f) => Pin::new(f).poll(cx),
        };
        let Poll::Ready(Ok(mut response)) = answer else {
            return answer;
        };
        if this.traced {
            response = ui::security_headers(response);
        }
        if let Some(span) = this.span.take() {
            spans::finish(&span, &response);
        }
        if let Some(timing) = this.timing.take() {
            timing.finish(&this.state, &response);
        }
        Poll::Ready(Ok(response))
    }
}
