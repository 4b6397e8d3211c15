//! Subscribe and SubscribeBatches on their own route, so a reading is encoded once for all its
//! subscribers.
//!
//! The generated server encodes each `Reading` per stream; with a hundred subscribers that meant a
//! hundred clones and encodings of every reading (measured with bench/agency_fanout: most of the
//! fan-out's CPU). Here the stream carries bytes already encoded by
//! [`FeedReading::encoded`](crate::store::FeedReading::encoded), and a codec that writes them as
//! they are. On the wire nothing changes: clients still receive `citygw.v1.Reading` messages
//! (and `citygw.v1.ReadingBatch` messages, which are the same encodings behind a field key).
//! Every other method goes to the generated server.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::Status;

use super::subscribe::{EncodedStream, Framing};
use super::{AgencyAuth, TelemetryService};
use crate::proto::SubscribeRequest;

const SUBSCRIBE_PATH: &str = "/citygw.v1.Telemetry/Subscribe";
const SUBSCRIBE_BATCHES_PATH: &str = "/citygw.v1.Telemetry/SubscribeBatches";

/// A `citygw.v1.Reading` or `citygw.v1.ReadingBatch`, already protobuf-encoded.
pub struct Encoded(pub Bytes);

struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = Encoded;
    type Decode = SubscribeRequest;
    type Encoder = EncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

struct SubscribeSvc {
    service: Arc<TelemetryService>,
    auth: AgencyAuth,
    framing: Framing,
}

impl ServerStreamingService<SubscribeRequest> for SubscribeSvc {
    type Response = Encoded;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<tonic::Response<EncodedStream>, Status>;

    fn call(&mut self, request: tonic::Request<SubscribeRequest>) -> Self::Future {
        let (service, auth, framing) = (self.service.clone(), self.auth.clone(), self.framing);
        Box::pin(async move {
            let agency = auth.agency(&request)?;
            let stream = service
                .subscribe_encoded(agency, request.into_inner(), framing)
                .await?;
            Ok(tonic::Response::new(stream))
        })
    }
}

/// The Telemetry service as served: Subscribe and SubscribeBatches here, the rest by the
/// generated server `S`.
#[derive(Clone)]
pub struct TelemetryRoutes<S> {
    pub generated: S,
    pub service: Arc<TelemetryService>,
    pub auth: AgencyAuth,
}

impl<S, B, RB> Service<http::Request<B>> for TelemetryRoutes<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible> + Send,
    S::Future: Send + 'static,
    RB: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<StdError>,
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let framing = match req.uri().path() {
            SUBSCRIBE_PATH => Framing::Each,
            SUBSCRIBE_BATCHES_PATH => Framing::Batches,
            _ => {
                let generated = self.generated.call(req);
                return Box::pin(async move { Ok(generated.await?.map(Body::new)) });
            }
        };
        let svc = SubscribeSvc {
            service: self.service.clone(),
            auth: self.auth.clone(),
            framing,
        };
        Box::pin(async move { Ok(Grpc::new(SubscribeCodec).server_streaming(svc, req).await) })
    }
}

impl<S> NamedService for TelemetryRoutes<S> {
    const NAME: &'static str = "citygw.v1.Telemetry";
}
