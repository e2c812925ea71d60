//! Building and reading ext_proc messages: headers in and out, the replies Envoy expects.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderMap, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::{
    processing_mode::{BodySendMode, HeaderSendMode},
    ProcessingMode,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_response::Response, BodyMutation, BodyResponse, CommonResponse,
    HeaderMutation, HeadersResponse, ImmediateResponse, ProcessingResponse, TrailersResponse,
};

/// Request or response headers as Envoy sent them (keys lower-cased by Envoy).
#[derive(Debug, Default)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn from_map(map: Option<&HeaderMap>) -> Self {
        let pairs = map
            .map(|m| m.headers.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|h| {
                // Envoy puts values in `raw_value`; older ones in `value`.
                let value = if h.raw_value.is_empty() {
                    h.value.clone()
                } else {
                    String::from_utf8_lossy(&h.raw_value).into_owned()
                };
                (h.key.to_ascii_lowercase(), value)
            })
            .collect();
        Self(pairs)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, joined as one list (`a, b`), as HTTP allows.
    pub fn joined(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
}

/// Headers to set, each replacing any value already there.
pub fn mutation(set: &[(&str, String)]) -> HeaderMutation {
    HeaderMutation {
        set_headers: set
            .iter()
            .map(|(k, v)| HeaderValueOption {
                header: Some(HeaderValue {
                    key: (*k).to_string(),
                    raw_value: v.clone().into_bytes(),
                    ..Default::default()
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            })
            .collect(),
        remove_headers: Vec::new(),
    }
}

fn common(headers: Option<HeaderMutation>) -> Option<CommonResponse> {
    Some(CommonResponse {
        header_mutation: headers,
        ..Default::default()
    })
}

/// What is still sent to us once we know we will not store: nothing more of either
/// body, and the response headers only when they get `x-semcache`.
pub fn mode(response_headers: bool) -> ProcessingMode {
    let send = |on: bool| {
        if on {
            HeaderSendMode::Send
        } else {
            HeaderSendMode::Skip
        }
    };
    ProcessingMode {
        request_header_mode: HeaderSendMode::Send as i32,
        response_header_mode: send(response_headers) as i32,
        request_body_mode: BodySendMode::None as i32,
        response_body_mode: BodySendMode::None as i32,
        request_trailer_mode: HeaderSendMode::Skip as i32,
        response_trailer_mode: HeaderSendMode::Skip as i32,
    }
}

pub fn request_headers(override_mode: Option<ProcessingMode>) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestHeaders(HeadersResponse {
            response: common(None),
        })),
        mode_override: override_mode,
        ..Default::default()
    }
}

pub fn response_headers(
    set: Option<HeaderMutation>,
    override_mode: Option<ProcessingMode>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseHeaders(HeadersResponse {
            response: common(set),
        })),
        mode_override: override_mode,
        ..Default::default()
    }
}

pub fn request_body() -> ProcessingResponse {
    request_body_with(&[], None)
}

/// The request goes on with these headers set and, if given, this body instead (with
/// its length; Envoy then matches its routes again, so a changed `model` or
/// `x-semcache-route` can pick another backend).
pub fn request_body_with(set: &[(&str, String)], body: Option<Vec<u8>>) -> ProcessingResponse {
    let mut set = set.to_vec();
    if let Some(body) = &body {
        set.push(("content-length", body.len().to_string()));
    }
    let changed = !set.is_empty();
    ProcessingResponse {
        response: Some(Response::RequestBody(BodyResponse {
            response: Some(CommonResponse {
                header_mutation: changed.then(|| mutation(&set)),
                body_mutation: body.map(|b| BodyMutation {
                    mutation: Some(body_mutation::Mutation::Body(b)),
                }),
                clear_route_cache: changed,
                ..Default::default()
            }),
        })),
        ..Default::default()
    }
}

pub fn response_body() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseBody(BodyResponse {
            response: common(None),
        })),
        ..Default::default()
    }
}

pub fn request_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::RequestTrailers(TrailersResponse::default())),
        ..Default::default()
    }
}

pub fn response_trailers() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ResponseTrailers(TrailersResponse::default())),
        ..Default::default()
    }
}

/// Envoy answers the client itself with this; the request never reaches the model.
/// `details` is what Envoy's access log shows as the reason (`semcache_hit`, …).
pub fn immediate(
    details: &str,
    status: u16,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(Response::ImmediateResponse(ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(mutation(headers)),
            body,
            grpc_status: None,
            details: details.into(),
        })),
        ..Default::default()
    }
}
