//! What a client is told of a call to a method the gRPC port does not
//! serve: UNIMPLEMENTED naming the method, and whether its service is
//! served at all, in place of the bare UNIMPLEMENTED without a message
//! tonic answers with (its router for an unknown service, a service's
//! generated code for an unknown method of it). A client built from other
//! .proto files than the control plane's, or a typo in a `grpcurl`
//! command, is then told what was not found.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::{Code, Status};

use super::quoted;

/// Wraps the whole router of the gRPC port: `services` are the full names
/// of the services it serves (`trellis.admin.v1.Admin`).
#[derive(Clone, Debug)]
pub struct UnknownMethodsLayer {
    services: &'static [&'static str],
}

impl UnknownMethodsLayer {
    pub fn new(services: &'static [&'static str]) -> Self {
        Self { services }
    }
}

impl<S> tower::Layer<S> for UnknownMethodsLayer {
    type Service = UnknownMethods<S>;

    fn layer(&self, inner: S) -> UnknownMethods<S> {
        UnknownMethods {
            inner,
            services: self.services,
        }
    }
}

/// The service of [`UnknownMethodsLayer`].
#[derive(Clone, Debug)]
pub struct UnknownMethods<S> {
    inner: S,
    services: &'static [&'static str],
}

impl<S> tower::Service<http::Request<Body>> for UnknownMethods<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let services = self.services;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(answer) = answer.await;
            match Status::from_header_map(answer.headers()) {
                // Every UNIMPLEMENTED the services answer themselves says why.
                Some(status)
                    if status.code() == Code::Unimplemented && status.message().is_empty() =>
                {
                    Ok(unknown(&path, services).into_http())
                }
                _ => Ok(answer),
            }
        })
    }
}

/// UNIMPLEMENTED for a call of `path` (`/package.Service/Method`), which
/// no service of `services` answers.
fn unknown(path: &str, services: &[&str]) -> Status {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.rsplit_once('/'))
        .map(|(service, _)| service);
    match service {
        Some(service) if services.contains(&service) => {
            Status::unimplemented(format!("{} is not a method of {service}", quoted(path)))
        }
        _ => Status::unimplemented(format!(
            "{} names no service of this control plane; it serves {}",
            quoted(path),
            services.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVED: &[&str] = &["trellis.admin.v1.Admin", "trellis.identity.v1.Identity"];

    #[test]
    fn an_unknown_method_of_a_served_service_is_named() {
        let status = unknown("/trellis.admin.v1.Admin/Nope", SERVED);
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(
            status.message(),
            "\"/trellis.admin.v1.Admin/Nope\" is not a method of trellis.admin.v1.Admin"
        );
    }

    #[test]
    fn an_unknown_service_lists_those_served() {
        for path in ["/foo.Bar/Baz", "/", "nothing", "/trellis.admin.v1/Admin/X"] {
            let status = unknown(path, SERVED);
            assert_eq!(
                status.message(),
                format!(
                    "{} names no service of this control plane; it serves \
                     trellis.admin.v1.Admin, trellis.identity.v1.Identity",
                    quoted(path)
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn a_huge_path_is_quoted_in_part() {
        let path = format!("/{}/X", "a".repeat(10_000));
        let status = unknown(&path, SERVED);
        assert!(status.message().len() < 200, "{}", status.message());
    }
}
