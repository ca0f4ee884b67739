//! WasmPlugin modules in OCI images, pulled over the OCI distribution API as Istio's agent pulls
//! them: the manifest (`GET /v2/<repository>/manifests/<tag or digest>`, an image index resolved
//! to one image), then the layer that holds the module (`GET /v2/<repository>/blobs/<digest>`).
//! Every document and blob is checked against the digest it was asked by.
//!
//! Registries that answer `401` with a `Bearer` challenge get an anonymous token from the
//! challenge's realm (Docker Hub, GHCR, Quay, ... for public images); `imagePullSecret`
//! credentials are not supported. A registry on this host (`localhost`, loopback addresses) that
//! answers TLS with plain HTTP is asked again over plain HTTP, as Docker and go-containerregistry
//! treat local registries; any other registry must speak TLS, so no one on the path can downgrade
//! a pull and hand over a module of their own. The token realm may not point at a cloud metadata
//! service.
//!
//! The image formats are Istio's (the Wasm image specification's two variants):
//! - Docker or OCI images whose last layer (`application/vnd.docker.image.rootfs.diff.tar.gzip`,
//!   `application/vnd.oci.image.layer.v1.tar+gzip`) is a gzipped tar holding `plugin.wasm`;
//! - OCI artifacts with a layer of type `application/vnd.module.wasm.content.layer.v1+wasm`,
//!   the module itself.
//!
//! A plugin's `sha256` is, for an image, the digest of the image manifest (as Istio checks it):
//! checked before any layer is downloaded.

use std::ffi::OsStr;
use std::io::Read;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{StatusCode, Uri};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{blocked_address, get, hex, read_body, FetchError, MAX_MODULE_BYTES};

/// The module itself, in the OCI artifact variant.
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// A gzipped tar holding `plugin.wasm`, in Docker and OCI images.
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The manifest types asked for: images (OCI, Docker) and indexes of them.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";
/// The file the tar variants hold the module in.
const PLUGIN_FILE: &str = "plugin.wasm";
/// Docker Hub's API host, for references without a registry (and `docker.io/...`).
const DOCKER_HUB: &str = "index.docker.io";
/// Registries must accept manifests of at least 4 MiB (distribution spec); no Wasm image needs
/// more.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Token answers are a JSON object with a (JWT) token or two.
const MAX_TOKEN_BYTES: usize = 1024 * 1024;
/// How much of a gzipped layer is unpacked looking for `plugin.wasm`: bounds a layer that
/// inflates without end.
const MAX_UNPACKED_LAYER_BYTES: u64 = 4 * MAX_MODULE_BYTES as u64;

/// Why an image gives no module (transport failures are the caller's [`FetchError`]s).
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("not an image reference: {0}")]
    Reference(&'static str),
    #[error("the registry {registry} wants credentials: this waypoint pulls images anonymously (imagePullSecret is not supported); make the image public, or serve the module over https")]
    Credentials { registry: String },
    #[error("the registry {registry} answered in plain HTTP: only registries on this host are pulled without TLS")]
    PlainHttp { registry: String },
    #[error("the registry's challenge {challenge:?} has no token realm")]
    Challenge { challenge: String },
    #[error("the registry's token realm {realm}: {reason}")]
    Realm { realm: String, reason: String },
    #[error("the token answer from {realm}: {reason}")]
    Token { realm: String, reason: String },
    #[error("the manifest {reference}: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("the registry's manifest for {reference} has digest sha256:{actual}: refused")]
    ManifestDigest { reference: String, actual: String },
    #[error("the image's digest is sha256:{actual}, but the plugin's sha256 is {expected} (for an image, sha256 is the manifest digest)")]
    ImageDigest { expected: String, actual: String },
    #[error("the image index has no single image to take (Istio takes linux/amd64); it lists {platforms}")]
    Platform { platforms: String },
    #[error("not a Wasm image: its layers are [{layers}]; expected a {WASM_LAYER} layer, or a last layer {OCI_LAYER} (or {DOCKER_LAYER}) holding {PLUGIN_FILE}")]
    Format { layers: String },
    #[error("the layer {digest}: only sha256 digests are supported")]
    DigestAlgorithm { digest: String },
    #[error(
        "the layer {digest} is {size} bytes, more than the {MAX_MODULE_BYTES} a module may have"
    )]
    LayerTooLarge { digest: String, size: u64 },
    #[error("the layer {digest} arrived with digest sha256:{actual}: refused")]
    BlobDigest { digest: String, actual: String },
    #[error("the layer {digest}: {reason}")]
    Archive { digest: String, reason: String },
}

/// An image reference: `[registry/]repository[:tag][@sha256:<hex>]`, Docker's grammar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` of the registry's API.
    registry: String,
    repository: String,
    tag: Option<String>,
    /// The 64 hex digits of a `@sha256:` digest.
    digest: Option<String>,
}

impl Reference {
    /// A registry on this host: the only kind pulled from without TLS.
    fn is_local(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => self.registry.as_str(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// `oci://` and scheme-less references; no tag and no digest is `:latest`.
    pub fn parse(url: &str) -> Result<Reference, OciError> {
        let bad = OciError::Reference;
        let text = url.strip_prefix("oci://").unwrap_or(url);
        let (rest, digest) = match text.rsplit_once('@') {
            Some((rest, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .filter(|h| is_sha256_hex(h))
                    .ok_or(bad("the digest after @ must be sha256: and 64 lowercase hexadecimal characters"))?;
                (rest, Some(hex.to_owned()))
            }
            None => (text, None),
        };
        // A colon after the last slash starts the tag (one before it is a registry's port).
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if !rest[colon..].contains('/') => {
                (&rest[..colon], Some(rest[colon + 1..].to_owned()))
            }
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            let ok = (1..=128).contains(&tag.len())
                && !tag.starts_with(['.', '-'])
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !ok {
                return Err(bad("a tag is 1 to 128 letters, digits, '_', '.' or '-'"));
            }
        }
        // Docker's rule: a first component with a dot or a port, or `localhost`, is a registry.
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = if registry == "docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        if !valid_registry(&registry) {
            return Err(bad(
                "the registry is not a host name or address with an optional port",
            ));
        }
        // Docker Hub's official images live under `library/`.
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !repository.split('/').all(valid_path_component) {
            return Err(bad("a repository path is lowercase letters and digits, separated by '/', '.', '_' or '-'"));
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`: the image without tag or digest.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Pinned by digest: the same manifest whatever the registry's tags do.
    pub fn is_pinned(&self) -> bool {
        self.digest.is_some()
    }

    /// Tagged `:latest` in so many words (Istio's test; an implied `latest` does not count).
    pub fn is_latest(&self) -> bool {
        self.digest.is_none() && self.tag.as_deref() == Some("latest")
    }

    /// What the manifest is asked by: the digest, else the tag.
    fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => format!("sha256:{digest}"),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@sha256:{digest}")?;
        }
        Ok(())
    }
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return false;
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => ("", after.strip_prefix(':').unwrap_or("x")),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, port),
            None => (registry, "0"),
        }
    };
    let host_ok = host.is_empty() && registry.starts_with('[')
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')));
    host_ok && port.parse::<u16>().is_ok()
}

/// Docker's path component: lowercase alphanumerics joined by one `.`, one or two `_`, or
/// dashes.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    alnum(first)
        && alnum(last)
        && bytes
            .iter()
            .all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        && !component.contains("..")
        && !component.contains("___")
}

/// One authentication challenge of a `WWW-Authenticate` header (RFC 9110 §11.6.1).
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The challenges of one header value: `Bearer realm="https://...",service="...",scope="..."`,
/// several challenges separated by commas too. Unparsable rests are dropped.
fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    let mut rest = header;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let token_end = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
        if token_end == 0 {
            return challenges;
        }
        let token = &rest[..token_end];
        let after = rest[token_end..].trim_start_matches([' ', '\t']);
        match after.strip_prefix('=') {
            // `name=value`: a parameter of the challenge being read.
            Some(value) if !value.starts_with('=') => {
                let value = value.trim_start_matches([' ', '\t']);
                let (value, remaining) = if let Some(quoted) = value.strip_prefix('"') {
                    match unquote(quoted) {
                        Some(parsed) => parsed,
                        None => return challenges,
                    }
                } else {
                    let end = value.find([',', ' ', '\t']).unwrap_or(value.len());
                    (value[..end].to_owned(), &value[end..])
                };
                match challenges.last_mut() {
                    Some(challenge) => challenge.params.push((token.to_owned(), value)),
                    None => return challenges,
                }
                rest = remaining;
            }
            // A bare token (or a token68 ending in `=`): a new challenge's scheme.
            _ => {
                challenges.push(Challenge {
                    scheme: token.to_owned(),
                    params: Vec::new(),
                });
                rest = after.trim_start_matches('=');
            }
        }
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// A quoted string's value and what follows its closing quote (`text` starts after the opening
/// quote); `None` if it never closes.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn query_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// The realm a token is asked from: any http(s) server but a cloud metadata service, which a
/// hostile registry could otherwise make the waypoint call.
fn checked_realm(realm: &str) -> Result<Uri, OciError> {
    let refuse = |reason: &str| OciError::Realm {
        realm: realm.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = realm.parse().map_err(|_| refuse("not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(refuse("not an http(s) URL"));
    }
    let host = uri.host().ok_or_else(|| refuse("no host"))?;
    if host.eq_ignore_ascii_case("metadata.google.internal") {
        return Err(refuse("a cloud metadata service"));
    }
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        if let Some(reason) = blocked_address(ip) {
            return Err(refuse(reason));
        }
    }
    Ok(uri)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    /// An image's layers.
    #[serde(default)]
    layers: Vec<Descriptor>,
    /// An index's images.
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// A manifest as the registry gave it.
struct Document {
    /// Hex sha256 of the bytes received.
    digest: String,
    /// The document's `mediaType`, else the answer's `Content-Type`.
    media_type: Option<String>,
    manifest: Manifest,
}

impl Document {
    fn is_index(&self) -> bool {
        match self.media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            // Some other type: an index only if it reads like one.
            Some(_) | None => {
                !self.manifest.manifests.is_empty() && self.manifest.layers.is_empty()
            }
        }
    }
}

/// The image an index points at: the only one, else Istio's linux/amd64, else a `wasi`/`wasm`
/// one. Attestations (platform `unknown/unknown`, as BuildKit adds them) are no images.
fn choose_image(entries: &[Descriptor]) -> Result<&Descriptor, OciError> {
    let images: Vec<&Descriptor> = entries
        .iter()
        .filter(|e| !matches!(e.media_type.as_str(), OCI_INDEX | DOCKER_LIST))
        .filter(|e| e.platform.as_ref().is_none_or(|p| p.os != "unknown"))
        .collect();
    let on = |os: &str, arch: &str| {
        images.iter().copied().find(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os.starts_with(os) && p.architecture.starts_with(arch))
        })
    };
    match images.as_slice() {
        [only] => Ok(only),
        _ => on("linux", "amd64")
            .or_else(|| on("wasi", ""))
            .or_else(|| on("", "wasm"))
            .ok_or_else(|| OciError::Platform {
                platforms: entries
                    .iter()
                    .map(|e| match &e.platform {
                        Some(p) => format!("{}/{}", p.os, p.architecture),
                        None => "(no platform)".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum LayerFormat {
    /// The layer is the module.
    Wasm,
    /// A gzipped tar holding `plugin.wasm`.
    TarGz,
}

/// Istio's order: a Docker image's last layer, an OCI image's last layer, then an OCI
/// artifact's Wasm layer.
fn module_layer(image: &Document) -> Result<(&Descriptor, LayerFormat), OciError> {
    let layers = &image.manifest.layers;
    let format_error = || OciError::Format {
        layers: layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let last = layers.last().ok_or_else(format_error)?;
    if image.media_type.as_deref() == Some(DOCKER_MANIFEST) {
        return match last.media_type.as_str() {
            DOCKER_LAYER => Ok((last, LayerFormat::TarGz)),
            _ => Err(format_error()),
        };
    }
    if last.media_type == OCI_LAYER {
        return Ok((last, LayerFormat::TarGz));
    }
    layers
        .iter()
        .find(|l| l.media_type == WASM_LAYER)
        .map(|l| (l, LayerFormat::Wasm))
        .ok_or_else(format_error)
}

/// `plugin.wasm` (anywhere in the archive, as Istio looks for it) from a gzipped tar.
fn extract_plugin(digest: &str, layer: &[u8]) -> Result<Bytes, OciError> {
    let archive_error = |reason: String| OciError::Archive {
        digest: digest.to_owned(),
        reason,
    };
    let unpacked = flate2::read::MultiGzDecoder::new(layer).take(MAX_UNPACKED_LAYER_BYTES);
    let mut archive = tar::Archive::new(unpacked);
    let entries = archive
        .entries()
        .map_err(|e| archive_error(format!("not a gzipped tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| archive_error(format!("not a gzipped tar: {e}")))?;
        let is_plugin = entry.header().entry_type().is_file()
            && entry
                .path()
                .is_ok_and(|p| p.file_name() == Some(OsStr::new(PLUGIN_FILE)));
        if !is_plugin {
            continue;
        }
        if entry.size() > MAX_MODULE_BYTES as u64 {
            return Err(archive_error(format!(
                "{PLUGIN_FILE} is {} bytes, more than the {MAX_MODULE_BYTES} a module may have",
                entry.size()
            )));
        }
        let mut module = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut module)
            .map_err(|e| archive_error(format!("reading {PLUGIN_FILE}: {e}")))?;
        return Ok(module.into());
    }
    Err(archive_error(format!("no {PLUGIN_FILE} in it")))
}

/// What an image gave: the module and the image manifest's digest (hex).
pub(super) struct Pulled {
    pub module: Bytes,
    pub digest: String,
}

/// The module in `reference`'s image. `sha256` is the plugin's (the image manifest digest);
/// `known` gives the module of a digest already pulled, which is then not downloaded again.
pub(super) async fn pull(
    reference: &Reference,
    sha256: Option<&str>,
    known: &(dyn Fn(&str) -> Option<Bytes> + Sync),
) -> Result<Pulled, FetchError> {
    let mut registry = Registry {
        reference,
        scheme: "https",
        token: None,
    };
    let asked = reference.manifest_reference();
    let top = match registry.manifest(&asked).await {
        Err(FetchError::NotTls { .. }) if !reference.is_local() => {
            return Err(registry.fail(OciError::PlainHttp {
                registry: reference.registry.clone(),
            }));
        }
        Err(FetchError::NotTls { url }) => {
            tracing::warn!(%url, "the local registry speaks plain HTTP: pulling the image without TLS");
            registry.scheme = "http";
            registry.manifest(&asked).await?
        }
        other => other?,
    };
    if let Some(pinned) = &reference.digest {
        if &top.digest != pinned {
            return Err(registry.fail(OciError::ManifestDigest {
                reference: asked,
                actual: top.digest,
            }));
        }
    }
    let image = if top.is_index() {
        let entry = choose_image(&top.manifest.manifests).map_err(|e| registry.fail(e))?;
        let child = registry.manifest(&entry.digest).await?;
        if Some(child.digest.as_str()) != entry.digest.strip_prefix("sha256:") {
            return Err(registry.fail(OciError::ManifestDigest {
                reference: entry.digest.clone(),
                actual: child.digest,
            }));
        }
        child
    } else {
        top
    };
    if let Some(expected) = sha256 {
        if !expected.eq_ignore_ascii_case(&image.digest) {
            return Err(registry.fail(OciError::ImageDigest {
                expected: expected.to_owned(),
                actual: image.digest,
            }));
        }
    }
    if let Some(module) = known(&image.digest) {
        return Ok(Pulled {
            module,
            digest: image.digest,
        });
    }
    let (layer, format) = module_layer(&image).map_err(|e| registry.fail(e))?;
    let blob = registry.blob(layer).await?;
    let module = match format {
        LayerFormat::Wasm => blob,
        LayerFormat::TarGz => extract_plugin(&layer.digest, &blob).map_err(|e| registry.fail(e))?,
    };
    Ok(Pulled {
        module,
        digest: image.digest,
    })
}

/// One pull's conversation with a registry.
struct Registry<'a> {
    reference: &'a Reference,
    scheme: &'static str,
    /// The bearer token, once a challenge was answered.
    token: Option<String>,
}

impl Registry<'_> {
    fn fail(&self, source: OciError) -> FetchError {
        FetchError::Oci {
            image: self.reference.to_string(),
            source,
        }
    }

    /// GET `path` on the registry; a `401` with a bearer challenge is answered once with an
    /// anonymous token, and the request made again.
    async fn get(
        &mut self,
        path: &str,
        accept: Option<&'static str>,
    ) -> Result<(Uri, http::Response<hyper::body::Incoming>), FetchError> {
        let url = format!("{}://{}{}", self.scheme, self.reference.registry, path);
        let uri: Uri = url.parse().map_err(|_| FetchError::Url {
            url: url.clone(),
            reason: "not a valid URL",
        })?;
        let mut challenged = false;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(ACCEPT, HeaderValue::from_static(accept));
            }
            if let Some(token) = &self.token {
                let value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    self.fail(OciError::Token {
                        realm: self.reference.registry.clone(),
                        reason: "the token is not a valid header value".into(),
                    })
                })?;
                headers.insert(AUTHORIZATION, value);
            }
            let (uri, response) = get(&uri, headers).await?;
            if response.status() != StatusCode::UNAUTHORIZED || challenged {
                return Ok((uri, response));
            }
            let challenges: Vec<Challenge> = response
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            let Some(bearer) = challenges
                .iter()
                .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
            else {
                return Err(self.credentials());
            };
            self.token = Some(self.token_for(bearer).await?);
            challenged = true;
        }
    }

    fn credentials(&self) -> FetchError {
        self.fail(OciError::Credentials {
            registry: self.reference.registry.clone(),
        })
    }

    /// An anonymous token from the challenge's realm, for its scope (else pulling this
    /// repository).
    async fn token_for(&self, challenge: &Challenge) -> Result<String, FetchError> {
        let realm = challenge.param("realm").ok_or_else(|| {
            self.fail(OciError::Challenge {
                challenge: format!("{challenge:?}"),
            })
        })?;
        let realm_uri = checked_realm(realm).map_err(|e| self.fail(e))?;
        let scope = challenge
            .param("scope")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
        let mut query = Vec::new();
        if let Some(service) = challenge.param("service") {
            query.push(format!("service={}", query_encode(service)));
        }
        query.push(format!("scope={}", query_encode(&scope)));
        let separator = if realm_uri.query().is_some() {
            '&'
        } else {
            '?'
        };
        let url = format!("{realm}{separator}{}", query.join("&"));
        let token_error = |reason: String| {
            self.fail(OciError::Token {
                realm: realm.to_owned(),
                reason,
            })
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| token_error("the token URL is not valid".into()))?;
        let (uri, response) = get(&uri, HeaderMap::new()).await?;
        match response.status() {
            status if status.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(self.credentials()),
            status => {
                return Err(FetchError::Status {
                    url: uri.to_string(),
                    status,
                })
            }
        }
        let body = read_body(&uri, response, MAX_TOKEN_BYTES).await?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("not the JSON of a token: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| token_error("no token in it".into()))
    }

    /// Refuses an answer that is not a success; `401`/`403` after the challenge was answered
    /// mean the image is not public.
    fn success(
        &self,
        uri: &Uri,
        response: &http::Response<hyper::body::Incoming>,
    ) -> Result<(), FetchError> {
        match response.status() {
            status if status.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(self.credentials()),
            status => Err(FetchError::Status {
                url: uri.to_string(),
                status,
            }),
        }
    }

    async fn manifest(&mut self, reference: &str) -> Result<Document, FetchError> {
        let path = format!("/v2/{}/manifests/{reference}", self.reference.repository);
        let (uri, response) = self.get(&path, Some(MANIFEST_ACCEPT)).await?;
        self.success(&uri, &response)?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let body = read_body(&uri, response, MAX_MANIFEST_BYTES).await?;
        let digest = hex(&Sha256::digest(&body));
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
            self.fail(OciError::Manifest {
                reference: reference.to_owned(),
                reason: format!("not a manifest: {e}"),
            })
        })?;
        let media_type = manifest.media_type.clone().or(content_type);
        Ok(Document {
            digest,
            media_type,
            manifest,
        })
    }

    async fn blob(&mut self, layer: &Descriptor) -> Result<Bytes, FetchError> {
        let Some(expected) = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| is_sha256_hex(h))
        else {
            return Err(self.fail(OciError::DigestAlgorithm {
                digest: layer.digest.clone(),
            }));
        };
        if layer.size > MAX_MODULE_BYTES as u64 {
            return Err(self.fail(OciError::LayerTooLarge {
                digest: layer.digest.clone(),
                size: layer.size,
            }));
        }
        let path = format!("/v2/{}/blobs/{}", self.reference.repository, layer.digest);
        let (uri, response) = self.get(&path, None).await?;
        self.success(&uri, &response)?;
        let blob = read_body(&uri, response, MAX_MODULE_BYTES).await?;
        let actual = hex(&Sha256::digest(&blob));
        if actual != expected {
            return Err(self.fail(OciError::BlobDigest {
                digest: layer.digest.clone(),
                actual,
            }));
        }
        Ok(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn reference(text: &str) -> Reference {
        Reference::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn only_registries_on_this_host_may_answer_in_plain_http() {
        for local in [
            "localhost:5000/f",
            "127.0.0.1:5000/f",
            "[::1]:5000/f",
            "localhost/f",
        ] {
            assert!(reference(local).is_local(), "{local}");
        }
        for remote in [
            "ghcr.io/f",
            "10.0.0.5:5000/f",
            "registry.local:5000/f",
            "nginx",
        ] {
            assert!(!reference(remote).is_local(), "{remote}");
        }
    }

    #[test]
    fn references_follow_dockers_grammar() {
        let r = reference("oci://ghcr.io/acme/filters/headers:v1.2");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("ghcr.io", "acme/filters/headers", Some("v1.2"))
        );
        assert_eq!(r.manifest_reference(), "v1.2");
        assert_eq!(r.to_string(), "ghcr.io/acme/filters/headers:v1.2");

        // A port is not a tag; no tag is latest (but not "tagged :latest").
        let r = reference("localhost:5000/filter");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "filter", None)
        );
        assert_eq!(r.manifest_reference(), "latest");
        assert!(!r.is_latest());
        assert!(reference("127.0.0.1:5000/a/b:latest").is_latest());

        // Docker Hub: no registry, or docker.io; official images under library/.
        let r = reference("nginx:1.27");
        assert_eq!(r.repository_name(), "index.docker.io/library/nginx");
        assert_eq!(
            reference("docker.io/istio/proxyv2").repository_name(),
            "index.docker.io/istio/proxyv2"
        );
        assert_eq!(
            reference("acme/filter").repository_name(),
            "index.docker.io/acme/filter"
        );

        // A digest wins over the tag for fetching, and pins the image.
        let digest = "0123456789abcdef".repeat(4);
        let r = reference(&format!("oci://[::1]:5000/f:latest@sha256:{digest}"));
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.manifest_reference(), format!("sha256:{digest}"));
        assert!(r.is_pinned() && !r.is_latest());
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "oci://",
            "ghcr.io/Acme/filter",
            "ghcr.io/acme//filter",
            "ghcr.io/acme/filter:",
            "ghcr.io/acme/filter:-x",
            "ghcr.io/acme/filter@sha256:abc",
            &format!("ghcr.io/acme/filter@md5:{}", "a".repeat(64)),
            "ghcr.io:port/acme/filter",
            "ghcr.io/acme/filter..x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn bearer_challenges_are_parsed() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#;
        let challenges = parse_challenges(header);
        assert_eq!(challenges.len(), 1);
        let c = &challenges[0];
        assert_eq!(c.scheme, "Bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("Service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/nginx:pull"));

        // Several challenges, spaces, a token value, an escaped quote.
        let challenges = parse_challenges(
            r#"Basic realm="reg", Bearer realm = "https://t.example/token?x=1" , error=insufficient_scope, scope="a\"b""#,
        );
        assert_eq!(
            challenges,
            vec![
                Challenge {
                    scheme: "Basic".into(),
                    params: vec![("realm".into(), "reg".into())],
                },
                Challenge {
                    scheme: "Bearer".into(),
                    params: vec![
                        ("realm".into(), "https://t.example/token?x=1".into()),
                        ("error".into(), "insufficient_scope".into()),
                        ("scope".into(), "a\"b".into()),
                    ],
                },
            ]
        );
        // A token68 (`Negotiate abc==`) is a scheme with no parameters.
        assert_eq!(parse_challenges("Negotiate")[0].params, vec![]);
        // An unterminated quote ends the parse without a panic.
        assert_eq!(
            parse_challenges(r#"Bearer realm="https://x"#)[0].params,
            vec![]
        );
    }

    #[test]
    fn token_queries_are_encoded_and_realms_checked() {
        assert_eq!(
            query_encode("repository:acme/f:pull"),
            "repository%3Aacme%2Ff%3Apull"
        );
        assert!(checked_realm("https://auth.docker.io/token").is_ok());
        // In-cluster registries (loopback, private addresses) are fine, as in Istio.
        assert!(checked_realm("http://10.0.0.5:5000/token").is_ok());
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/t",
            "http://metadata.google.internal/t",
            "http://100.100.100.200/t",
            "http://[fd00:ec2::254]/t",
            "file:///etc/passwd",
            "/token",
        ] {
            assert!(checked_realm(bad).is_err(), "{bad} was accepted");
        }
    }

    fn descriptor(media_type: &str, platform: Option<(&str, &str)>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "c".repeat(64)),
            size: 10,
            platform: platform.map(|(os, architecture)| Platform {
                os: os.into(),
                architecture: architecture.into(),
            }),
        }
    }

    #[test]
    fn an_index_resolves_to_one_image() {
        let chosen =
            |entries: &[Descriptor]| choose_image(entries).unwrap().platform.clone().unwrap();
        // BuildKit's single-platform push: the image and its attestation.
        let entries = [
            descriptor(OCI_MANIFEST, Some(("linux", "arm64"))),
            descriptor(OCI_MANIFEST, Some(("unknown", "unknown"))),
        ];
        assert_eq!(chosen(&entries).architecture, "arm64");
        let entries = [
            descriptor(OCI_MANIFEST, Some(("linux", "arm64"))),
            descriptor(OCI_MANIFEST, Some(("linux", "amd64"))),
        ];
        assert_eq!(chosen(&entries).architecture, "amd64");
        let entries = [
            descriptor(OCI_MANIFEST, Some(("linux", "arm64"))),
            descriptor(OCI_MANIFEST, Some(("wasip1", "wasm"))),
        ];
        assert_eq!(chosen(&entries).os, "wasip1");
        let entries = [
            descriptor(OCI_MANIFEST, Some(("linux", "arm64"))),
            descriptor(OCI_MANIFEST, Some(("linux", "s390x"))),
        ];
        let err = choose_image(&entries).unwrap_err().to_string();
        assert!(err.contains("linux/arm64, linux/s390x"), "{err}");
    }

    fn image(media_type: Option<&str>, layers: &[&str]) -> Document {
        Document {
            digest: String::new(),
            media_type: media_type.map(str::to_owned),
            manifest: Manifest {
                media_type: None,
                layers: layers.iter().map(|l| descriptor(l, None)).collect(),
                manifests: Vec::new(),
            },
        }
    }

    #[test]
    fn the_module_layer_is_chosen_like_istio() {
        let format = |media_type, layers: &[&str]| {
            module_layer(&image(media_type, layers)).map(|(_, format)| format)
        };
        assert_eq!(
            format(Some(DOCKER_MANIFEST), &[DOCKER_LAYER]).unwrap(),
            LayerFormat::TarGz
        );
        assert_eq!(
            format(Some(OCI_MANIFEST), &[OCI_LAYER, OCI_LAYER]).unwrap(),
            LayerFormat::TarGz
        );
        assert_eq!(
            format(
                None,
                &[
                    WASM_LAYER,
                    "application/vnd.module.wasm.runtime.config.v1+json"
                ]
            )
            .unwrap(),
            LayerFormat::Wasm
        );
        // A Docker manifest's layer must be Docker's; an uncompressed tar is no format.
        assert!(format(Some(DOCKER_MANIFEST), &[OCI_LAYER]).is_err());
        let err = format(
            Some(OCI_MANIFEST),
            &["application/vnd.oci.image.layer.v1.tar"],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[application/vnd.oci.image.layer.v1.tar]"),
            "{err}"
        );
        assert!(format(Some(OCI_MANIFEST), &[]).is_err());
    }

    fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, *content).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn plugin_wasm_is_extracted_from_a_gzipped_tar() {
        let module: &[u8] = b"\0asm\x01\0\0\0";
        let layer = tar_gz(&[("README", b"not this"), ("./plugin.wasm", module)]);
        assert_eq!(&extract_plugin("sha256:x", &layer).unwrap()[..], module);
        // Anywhere in the tree, and past a long (GNU long name) path.
        let deep = format!("{}/plugin.wasm", "d".repeat(150));
        let layer = tar_gz(&[(deep.as_str(), module)]);
        assert_eq!(&extract_plugin("sha256:x", &layer).unwrap()[..], module);

        let err = extract_plugin("sha256:x", &tar_gz(&[("filter.wasm", module)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no plugin.wasm"), "{err}");
        let err = extract_plugin("sha256:x", module).unwrap_err().to_string();
        assert!(err.contains("not a gzipped tar"), "{err}");
    }
}
