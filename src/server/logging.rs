//! Logging: slog to stderr, JSON (for journald) or plain key=value text, plus an access-log
//! middleware that never logs request headers (tokens live there).

use std::future::{ready, Ready};
use std::io::Write;
use std::time::Instant;

use actix_web::dev::{forward_ready, Service, ServiceRequest, ServiceResponse, Transform};
use futures_util::future::LocalBoxFuture;
use slog::{o, Drain, Logger};

/// A text drain: `ts LEVEL msg key=value ...`.
struct TextDrain;

impl Drain for TextDrain {
    type Ok = ();
    type Err = std::io::Error;
    fn log(&self, r: &slog::Record<'_>, kv: &slog::OwnedKVList) -> Result<(), std::io::Error> {
        struct Ser(String);
        impl slog::Serializer for Ser {
            fn emit_arguments(
                &mut self,
                key: slog::Key,
                val: &std::fmt::Arguments<'_>,
            ) -> slog::Result {
                self.0.push_str(&format!(" {key}={val}"));
                Ok(())
            }
        }
        let mut s = Ser(String::new());
        let _ = slog::KV::serialize(&r.kv(), r, &mut s);
        let _ = slog::KV::serialize(kv, r, &mut s);
        let line = format!(
            "{} {} {}{}\n",
            prepub_core::timefmt::stamp(prepub_core::timefmt::now()),
            r.level().as_short_str(),
            r.msg(),
            s.0
        );
        std::io::stderr().write_all(line.as_bytes())
    }
}

/// The root logger.
pub fn logger(json: bool) -> Logger {
    if json {
        let drain = slog_json::Json::new(std::io::stderr())
            .add_default_keys()
            .build()
            .fuse();
        let drain = slog_async::Async::new(drain).build().fuse();
        Logger::root(drain, o!("service" => "cvmfs-prepub"))
    } else {
        let drain = slog_async::Async::new(TextDrain.fuse()).build().fuse();
        Logger::root(drain, o!())
    }
}

/// Access-log middleware: method, path, status, duration.
pub struct AccessLog(pub Logger);

impl<S, B> Transform<S, ServiceRequest> for AccessLog
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = AccessLogMw<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(AccessLogMw {
            service,
            log: self.0.clone(),
        }))
    }
}

pub struct AccessLogMw<S> {
    service: S,
    log: Logger,
}

impl<S, B> Service<ServiceRequest> for AccessLogMw<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let method = req.method().to_string();
        let path = req.path().to_string();
        let log = self.log.clone();
        let start = Instant::now();
        let fut = self.service.call(req);
        Box::pin(async move {
            let res = fut.await?;
            slog::info!(log, "request"; "actor" => "http", "method" => method, "path" => path,
                "status" => res.status().as_u16(), "ms" => start.elapsed().as_millis() as u64);
            Ok(res)
        })
    }
}
