//! The deployment artefacts under `deploy/`, checked against each other and
//! against the code they deploy.
//!
//! - Every YAML document under `deploy/` parses, and every kustomization names
//!   files that exist (secrets: their checked-in `.example`).
//! - Each overlay, with each mesh component (and the monitoring component), is
//!   assembled into one set of objects and cross-checked: Services, probes,
//!   PodDisruptionBudgets, NetworkPolicies and mesh policies meet the pods and
//!   ports they are meant for; every Secret and ConfigMap a pod uses exists and
//!   holds the key it reads; the ConfigMap's `config.toml`, with the pod's
//!   environment, loads and validates as a `tokenbroker::config::Config` whose
//!   ports are the container's; the mesh policies allow exactly the callers and
//!   operations of the shipped broker policy, by the gRPC methods of
//!   `proto/tokenbroker/v1/broker.proto`.
//! - The objects are assembled twice: from the source files (resources and
//!   generators, patches only checked for their targets), and, where `kubectl`
//!   is installed, as `kubectl kustomize` renders them (patches applied, names
//!   hashed); the same checks run on both, plus the patches' effects on the
//!   rendered pods.
//! - The Grafana dashboard queries only metrics in `tokenbroker::metrics::ALL`
//!   (histograms only through `_bucket`/`_sum`/`_count`) and shows every one.
//! - The Dockerfile exposes the container ports and runs as the pods' user.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokenbroker::auth::{CallerId, Decision, Operation, Policy};
use tokenbroker::config::{Config, StoreKind};
use yaml_rust2::{Yaml, YamlLoader};

// ---------------------------------------------------------------------------
// Where things are

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn kube() -> PathBuf {
    deploy().join("kubernetes")
}

const OVERLAYS: [&str; 2] = ["single-node", "ha"];
const MESHES: [&str; 2] = ["istio", "linkerd"];
/// The container that runs the broker in every workload.
const CONTAINER: &str = "tokenbroker";
/// The proto service and the policy operation each of its methods is.
const SERVICE: &str = "tokenbroker.v1.TokenBroker";
const METHOD_OPERATIONS: [(&str, &str); 6] = [
    ("RegisterSession", "register"),
    ("GetAccessToken", "get"),
    ("WatchToken", "watch"),
    ("GetSession", "inspect"),
    ("ListSessions", "inspect"),
    ("DeleteSession", "delete"),
];

// ---------------------------------------------------------------------------
// YAML

/// A YAML node as JSON, so manifests and the dashboard share one tree type.
fn to_json(yaml: &Yaml, at: &str) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(text) => json!(text.parse::<f64>().unwrap()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(|i| to_json(i, at)).collect()),
        Yaml::Hash(map) => {
            let mut object = Map::new();
            for (key, value) in map {
                let key = match key {
                    Yaml::String(s) => s.clone(),
                    other => panic!("{at}: non-string key {other:?}"),
                };
                object.insert(key, to_json(value, at));
            }
            Value::Object(object)
        }
        Yaml::Alias(_) | Yaml::BadValue => panic!("{at}: anchors and aliases are not used here"),
    }
}

/// Every document of a YAML text (empty documents skipped).
fn parse_yaml(text: &str, at: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{at}: {e}"));
    docs.iter()
        .map(|doc| to_json(doc, at))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn read_yaml(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_yaml(&text, &path.display().to_string())
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(dir, &mut all);
    let mut yaml: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    yaml.sort();
    yaml
}

fn s<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn list<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn kind(doc: &Value) -> &str {
    s(doc, "/kind").unwrap_or("")
}

fn name(doc: &Value) -> &str {
    s(doc, "/metadata/name").unwrap_or("")
}

fn describe(doc: &Value) -> String {
    format!("{} {}", kind(doc), name(doc))
}

// ---------------------------------------------------------------------------
// Kustomizations

fn kustomization_of(dir: &Path) -> Value {
    let path = dir.join("kustomization.yaml");
    let mut docs = read_yaml(&path);
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    docs.remove(0)
}

/// The files a generator entry reads: `files` (`key=path` or `path`) and `envs`.
fn generator_files(generator: &Value) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for entry in list(generator, "/files") {
        let entry = entry.as_str().unwrap();
        let (key, path) = match entry.split_once('=') {
            Some((key, path)) => (key.to_string(), path.to_string()),
            None => {
                let key = Path::new(entry).file_name().unwrap().to_string_lossy();
                (key.into_owned(), entry.to_string())
            }
        };
        files.push((key, path));
    }
    for entry in list(generator, "/envs") {
        files.push((String::new(), entry.as_str().unwrap().to_string()));
    }
    files
}

/// Problems with the paths one kustomization names, and the YAML files it uses.
fn check_kustomization_paths(dir: &Path, used: &mut BTreeSet<PathBuf>) -> Vec<String> {
    let k = kustomization_of(dir);
    let at = dir.strip_prefix(root()).unwrap().display().to_string();
    let mut problems = Vec::new();
    for deprecated in ["bases", "patchesStrategicMerge", "patchesJson6902", "vars"] {
        if k.get(deprecated).is_some() {
            problems.push(format!("{at}: uses the deprecated `{deprecated}`"));
        }
    }
    for resource in list(&k, "/resources") {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            if !path.join("kustomization.yaml").is_file() {
                problems.push(format!(
                    "{at}: resource {} has no kustomization.yaml",
                    path.display()
                ));
            }
        } else if path.is_file() {
            used.insert(path.canonicalize().unwrap());
        } else {
            problems.push(format!("{at}: resource {} does not exist", path.display()));
        }
    }
    for component in list(&k, "/components") {
        let path = dir.join(component.as_str().unwrap());
        if !path.join("kustomization.yaml").is_file() {
            problems.push(format!("{at}: component {} does not exist", path.display()));
        } else if kind(&kustomization_of(&path)) != "Component" {
            problems.push(format!("{at}: {} is not a kind: Component", path.display()));
        }
    }
    for patch in list(&k, "/patches") {
        let Some(file) = s(patch, "/path") else {
            continue;
        };
        let path = dir.join(file);
        if path.is_file() {
            used.insert(path.canonicalize().unwrap());
        } else {
            problems.push(format!("{at}: patch {} does not exist", path.display()));
        }
    }
    for generator in list(&k, "/configMapGenerator")
        .iter()
        .chain(list(&k, "/secretGenerator"))
    {
        for (_, file) in generator_files(generator) {
            let path = dir.join(&file);
            let example = dir.join(format!("{file}.example"));
            if !path.is_file() && !example.is_file() {
                problems.push(format!(
                    "{at}: generator {} reads {file}, which exists neither as such nor as {file}.example",
                    s(generator, "/name").unwrap_or("")
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Assembling an overlay from its sources

/// The objects of one deployment variant, and what the test knows of how they
/// came together.
#[derive(Debug, Default)]
struct Bundle {
    label: String,
    docs: Vec<Value>,
    /// Patch targets (kind, name) from the kustomizations (source assembly only).
    patch_targets: Vec<(String, String, String)>,
    /// Whether kustomize rendered it (patches applied).
    rendered: bool,
}

/// Test-only stand-ins for the gitignored secret files, by file name.
fn test_secret(file_name: &str) -> Option<String> {
    match file_name {
        "keys" => {
            let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
            Some(format!("# test ring\nk1:{key}\n"))
        }
        "postgres.env" => {
            Some("url=postgres://tokenbroker@postgres.test:5432/tokenbroker\n".into())
        }
        _ => None,
    }
}

/// What a generator file holds: the real file if present, else the test
/// stand-in (the real one is gitignored).
fn generator_input(path: &Path) -> String {
    if path.is_file() {
        return std::fs::read_to_string(path).unwrap();
    }
    let file_name = path.file_name().unwrap().to_string_lossy();
    test_secret(&file_name).unwrap_or_else(|| panic!("no test stand-in for {}", path.display()))
}

fn generated(kind: &str, generator: &Value, dir: &Path) -> Value {
    let mut data = Map::new();
    for (key, file) in generator_files(generator) {
        let text = generator_input(&dir.join(&file));
        if key.is_empty() {
            for line in text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                let (k, v) = line.split_once('=').unwrap();
                data.insert(k.to_string(), json!(v));
            }
        } else {
            data.insert(key, json!(text));
        }
    }
    for literal in list(generator, "/literals") {
        let (k, v) = literal.as_str().unwrap().split_once('=').unwrap();
        data.insert(k.to_string(), json!(v));
    }
    if kind == "Secret" {
        for value in data.values_mut() {
            let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_str().unwrap());
            *value = json!(encoded);
        }
    }
    let name_ = s(generator, "/name").unwrap();
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name_}, "data": data})
}

/// Resources, components and generators of `dir`, recursively; `components`
/// replaces the kustomization's own list when given.
fn assemble(dir: &Path, components: Option<&[PathBuf]>, bundle: &mut Bundle) {
    let k = kustomization_of(dir);
    for resource in list(&k, "/resources") {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            assemble(&path, None, bundle);
        } else {
            bundle.docs.extend(read_yaml(&path));
        }
    }
    for (key, kind) in [
        ("/configMapGenerator", "ConfigMap"),
        ("/secretGenerator", "Secret"),
    ] {
        for generator in list(&k, key) {
            bundle.docs.push(generated(kind, generator, dir));
        }
    }
    let own: Vec<PathBuf> = list(&k, "/components")
        .iter()
        .map(|c| dir.join(c.as_str().unwrap()))
        .collect();
    for component in components.unwrap_or(&own) {
        assemble(component, None, bundle);
    }
    for patch in list(&k, "/patches") {
        let target = |field: &str| {
            s(patch, &format!("/target/{field}"))
                .unwrap_or("")
                .to_string()
        };
        let at = dir.strip_prefix(root()).unwrap().display().to_string();
        bundle
            .patch_targets
            .push((at, target("kind"), target("name")));
    }
}

/// The mesh component an overlay ships with, and the components of a variant.
fn variant_components(overlay: &str, mesh: &str) -> Vec<PathBuf> {
    let dir = kube().join("overlays").join(overlay);
    let k = kustomization_of(&dir);
    let shipped: Vec<&str> = list(&k, "/components")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let meshes: Vec<&&str> = shipped
        .iter()
        .filter(|c| c.starts_with("../../mesh/"))
        .collect();
    assert_eq!(
        meshes.len(),
        1,
        "overlays/{overlay} must ship with exactly one mesh component: {shipped:?}"
    );
    let mut components: Vec<PathBuf> = shipped
        .iter()
        .map(|c| {
            if c.starts_with("../../mesh/") {
                dir.join(format!("../../mesh/{mesh}"))
            } else {
                dir.join(c)
            }
        })
        .collect();
    if !shipped.contains(&"../../monitoring") {
        components.push(dir.join("../../monitoring"));
    }
    components
}

fn source_bundle(overlay: &str, mesh: &str) -> Bundle {
    let mut bundle = Bundle {
        label: format!("{overlay} + {mesh} (from the sources)"),
        ..Bundle::default()
    };
    let components = variant_components(overlay, mesh);
    assemble(
        &kube().join("overlays").join(overlay),
        Some(&components),
        &mut bundle,
    );
    bundle
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn kubectl_kustomize_available() -> bool {
    Command::new("kubectl")
        .args(["kustomize", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `kubectl kustomize` of a copy of `deploy/kubernetes` in which the overlay
/// uses `mesh` and the monitoring component, with test stand-ins for the
/// gitignored secret files.
fn rendered_bundle(overlay: &str, mesh: &str) -> Bundle {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("kubernetes");
    copy_tree(&kube(), &tree);
    let dir = tree.join("overlays").join(overlay);
    let components: Vec<String> = variant_components(overlay, mesh)
        .iter()
        .map(|p| {
            let relative = p
                .strip_prefix(kube().join("overlays").join(overlay))
                .unwrap();
            relative.display().to_string()
        })
        .collect();
    let mut k = kustomization_of(&dir);
    k["components"] = json!(components);
    for generator in list(&k, "/secretGenerator").to_vec() {
        for (_, file) in generator_files(&generator) {
            let path = dir.join(&file);
            if !path.is_file() {
                std::fs::write(&path, generator_input(&path)).unwrap();
            }
        }
    }
    // JSON is YAML: the rewritten kustomization needs no emitter.
    std::fs::write(dir.join("kustomization.yaml"), k.to_string()).unwrap();
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize overlays/{overlay} with {mesh}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Bundle {
        label: format!("{overlay} + {mesh} (rendered by kubectl kustomize)"),
        docs: parse_yaml(&text, &format!("rendered {overlay} + {mesh}")),
        patch_targets: Vec::new(),
        rendered: true,
    }
}

// ---------------------------------------------------------------------------
// Selectors and pods

/// Whether a label selector (`matchLabels`/`matchExpressions`, or a Service's
/// plain map when `plain`) selects `labels`.
fn selects(selector: &Value, labels: &Value, plain: bool) -> bool {
    let empty = Map::new();
    let labels = labels.as_object().unwrap_or(&empty);
    let match_labels = if plain {
        selector.as_object()
    } else {
        selector.get("matchLabels").and_then(Value::as_object)
    };
    for (key, value) in match_labels.unwrap_or(&empty) {
        if labels.get(key) != Some(value) {
            return false;
        }
    }
    if plain {
        return true;
    }
    for expression in list(selector, "/matchExpressions") {
        let key = s(expression, "/key").unwrap();
        let values: Vec<&str> = list(expression, "/values")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let label = labels.get(key).and_then(Value::as_str);
        let ok = match s(expression, "/operator").unwrap() {
            "In" => label.is_some_and(|l| values.contains(&l)),
            "NotIn" => label.is_none_or(|l| !values.contains(&l)),
            "Exists" => label.is_some(),
            "DoesNotExist" => label.is_none(),
            other => panic!("unknown selector operator {other}"),
        };
        if !ok {
            return false;
        }
    }
    true
}

#[derive(Debug, Clone)]
struct Port {
    name: String,
    number: i64,
}

/// The broker's pod in a bundle: the one workload, its pod labels, its broker
/// container and that container's ports.
struct Pod<'a> {
    workload: &'a Value,
    labels: &'a Value,
    spec: &'a Value,
    container: &'a Value,
    ports: Vec<Port>,
}

impl Pod<'_> {
    fn port_named(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Whether a port reference (a name or a number) is one of the container's.
    fn has_port(&self, reference: &Value) -> bool {
        match reference {
            Value::String(name) => self.port_named(name).is_some(),
            Value::Number(n) => self.ports.iter().any(|p| Some(p.number) == n.as_i64()),
            _ => false,
        }
    }
}

const WORKLOAD_KINDS: [&str; 3] = ["Deployment", "StatefulSet", "DaemonSet"];

fn broker_pod(bundle: &Bundle) -> Pod<'_> {
    let workloads: Vec<&Value> = bundle
        .docs
        .iter()
        .filter(|d| WORKLOAD_KINDS.contains(&kind(d)))
        .collect();
    assert_eq!(workloads.len(), 1, "{}: one workload", bundle.label);
    let workload = workloads[0];
    let spec = workload.pointer("/spec/template/spec").unwrap();
    let container = list(spec, "/containers")
        .iter()
        .find(|c| s(c, "/name") == Some(CONTAINER))
        .unwrap_or_else(|| panic!("{}: no container named {CONTAINER}", bundle.label));
    let ports = list(container, "/ports")
        .iter()
        .map(|p| Port {
            name: s(p, "/name").unwrap_or("").to_string(),
            number: p["containerPort"].as_i64().unwrap(),
        })
        .collect();
    Pod {
        workload,
        labels: workload
            .pointer("/spec/template/metadata/labels")
            .unwrap_or(&Value::Null),
        spec,
        container,
        ports,
    }
}

fn find<'a>(bundle: &'a Bundle, kind_: &str, name_: &str) -> Option<&'a Value> {
    bundle
        .docs
        .iter()
        .find(|d| kind(d) == kind_ && name(d) == name_)
}

fn of_kind<'a>(bundle: &'a Bundle, kind_: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    bundle.docs.iter().filter(move |d| kind(d) == kind_)
}

/// A ConfigMap's or Secret's value under `key`, decoded.
fn data_value(doc: &Value, key: &str) -> Option<String> {
    let value = doc.pointer(&format!("/data/{key}"))?.as_str()?;
    if kind(doc) == "Secret" {
        // kustomize folds long values over several lines; the API server's
        // base64 decoder skips the line breaks, and so does this.
        let value: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()?;
        String::from_utf8(bytes).ok()
    } else {
        Some(value.to_string())
    }
}

// ---------------------------------------------------------------------------
// The configuration the pod runs with

struct Effective {
    /// Loaded with the pod's environment and validated.
    config: Config,
    /// The pod's environment (values resolved).
    env: BTreeMap<String, String>,
}

/// The file at `path` as the pod sees it: from a ConfigMap mounted over it.
fn mounted_file(
    bundle: &Bundle,
    pod: &Pod,
    path: &str,
    problems: &mut Vec<String>,
) -> Option<String> {
    let mount = list(pod.container, "/volumeMounts").iter().find(|m| {
        let dir = s(m, "/mountPath").unwrap();
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
    });
    let Some(mount) = mount else {
        problems.push(format!("{}: nothing is mounted over {path}", bundle.label));
        return None;
    };
    let file = Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let volume_name = s(mount, "/name").unwrap();
    let volume = list(pod.spec, "/volumes")
        .iter()
        .find(|v| s(v, "/name") == Some(volume_name))?;
    let mut config_maps: Vec<&str> = list(volume, "/projected/sources")
        .iter()
        .filter_map(|source| s(source, "/configMap/name"))
        .collect();
    config_maps.extend(s(volume, "/configMap/name"));
    let found = config_maps
        .iter()
        .filter_map(|cm| find(bundle, "ConfigMap", cm))
        .find_map(|cm| data_value(cm, &file));
    if found.is_none() {
        problems.push(format!(
            "{}: {path} is mounted from volume {volume_name}, whose ConfigMaps {config_maps:?} hold no {file}",
            bundle.label
        ));
    }
    found
}

/// The pod's environment: literal values, and values from the Secrets and
/// ConfigMaps of the bundle (a missing one is a problem).
fn pod_env(bundle: &Bundle, pod: &Pod, problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in list(pod.container, "/envFrom") {
        for (field, kind_) in [("configMapRef", "ConfigMap"), ("secretRef", "Secret")] {
            let Some(source) = s(from, &format!("/{field}/name")) else {
                continue;
            };
            match find(bundle, kind_, source) {
                Some(doc) => {
                    for key in doc["data"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k)
                    {
                        env.insert(key.clone(), data_value(doc, key).unwrap());
                    }
                }
                None => problems.push(format!(
                    "{}: envFrom {kind_} {source} does not exist",
                    bundle.label
                )),
            }
        }
    }
    for var in list(pod.container, "/env") {
        let var_name = s(var, "/name").unwrap().to_string();
        if let Some(value) = s(var, "/value") {
            env.insert(var_name, value.to_string());
            continue;
        }
        for (field, kind_) in [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")] {
            let Some(source) = s(var, &format!("/valueFrom/{field}/name")) else {
                continue;
            };
            let key = s(var, &format!("/valueFrom/{field}/key")).unwrap();
            match find(bundle, kind_, source).and_then(|doc| data_value(doc, key)) {
                Some(value) => {
                    env.insert(var_name.clone(), value);
                }
                None => problems.push(format!(
                    "{}: env {var_name} reads key {key:?} of {kind_} {source}: no such {kind_} or key",
                    bundle.label
                )),
            }
        }
    }
    env
}

fn effective_config(bundle: &Bundle, pod: &Pod, problems: &mut Vec<String>) -> Option<Effective> {
    let args: Vec<&str> = list(pod.container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let Some(at) = args.iter().position(|a| *a == "--config") else {
        problems.push(format!(
            "{}: the broker is not given --config",
            bundle.label
        ));
        return None;
    };
    let path = args[at + 1];
    let text = mounted_file(bundle, pod, path, problems)?;
    let file: toml::Table = match toml::from_str(&text) {
        Ok(table) => table,
        Err(e) => {
            problems.push(format!("{}: {path} is not TOML: {e}", bundle.label));
            return None;
        }
    };
    let env = pod_env(bundle, pod, problems);
    let scratch = tempfile::tempdir().unwrap();
    let load = |table: &toml::Table| {
        let file = scratch.path().join("config.toml");
        std::fs::write(&file, toml::to_string(table).unwrap()).unwrap();
        Config::load(Some(&file), env.clone())
    };
    let config = match load(&file) {
        Ok(config) => config,
        Err(e) => {
            problems.push(format!(
                "{}: {path} with the pod's environment: {e}",
                bundle.label
            ));
            return None;
        }
    };
    if let Err(e) = config.validate() {
        problems.push(format!(
            "{}: {path} with the pod's environment is invalid: {e}",
            bundle.label
        ));
    }
    Some(Effective { config, env })
}

// ---------------------------------------------------------------------------
// The broker policy and the gRPC methods

/// The rpc names of the service in the proto file.
fn proto_methods() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("proto/tokenbroker/v1/broker.proto")).unwrap();
    let service = text
        .split("service TokenBroker")
        .nth(1)
        .expect("broker.proto declares service TokenBroker");
    let body = &service[..service.find('}').unwrap()];
    body.lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .map(|rest| rest[..rest.find('(').unwrap()].trim().to_string())
        .collect()
}

fn operation(name: &str) -> Operation {
    *Operation::ALL
        .iter()
        .find(|op| op.as_str() == name)
        .unwrap_or_else(|| panic!("unknown operation {name}"))
}

fn methods_of(op: &str) -> Vec<&'static str> {
    METHOD_OPERATIONS
        .iter()
        .filter(|(_, o)| op == "*" || *o == op)
        .map(|(m, _)| *m)
        .collect()
}

/// The (caller, method) pairs the shipped policy grants on some session, from
/// its rules; checked against `Policy::decide` so this reading cannot drift
/// from the broker's.
fn policy_grants(
    policy_text: &str,
    at: &str,
    problems: &mut Vec<String>,
) -> BTreeSet<(String, String)> {
    let policy = match Policy::parse(policy_text) {
        Ok(policy) => policy,
        Err(e) => {
            problems.push(format!("{at}: the broker refuses the policy: {e}"));
            return BTreeSet::new();
        }
    };
    let table: toml::Table = toml::from_str(policy_text).unwrap();
    let rules = table
        .get("rules")
        .and_then(|r| r.as_array())
        .cloned()
        .unwrap_or_default();
    let mut grants = BTreeSet::new();
    let strings = |rule: &toml::Value, key: &str| -> Vec<String> {
        rule.get(key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    for (index, rule) in rules.iter().enumerate() {
        let callers = strings(rule, "callers");
        let sessions = strings(rule, "sessions");
        let allowed: BTreeSet<String> = strings(rule, "allow")
            .iter()
            .flat_map(|op| methods_of(op))
            .map(|m| {
                METHOD_OPERATIONS
                    .iter()
                    .find(|(x, _)| *x == m)
                    .unwrap()
                    .1
                    .to_string()
            })
            .collect();
        let any_owner = rule
            .get("any_owner")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        for caller in &callers {
            if caller.contains('*') {
                problems.push(format!(
                    "{at}: rules[{index}] caller {caller} is a pattern: the shipped example uses exact \
                     identities, so that the mesh policies can be checked against it"
                ));
                continue;
            }
            let id = CallerId::new(caller.as_str());
            let other = CallerId::new("someone-else.example");
            let session = sessions[0].replace('*', "x");
            let owner = if any_owner { &other } else { &id };
            for op in Operation::ALL {
                let decided = policy.decide(&id, op, &session, Some(owner));
                let granted = allowed.contains(op.as_str());
                if granted && decided != Decision::Allow {
                    problems.push(format!(
                        "{at}: rules[{index}] reads as granting {caller} {op} on {session}, but the \
                         broker decides {decided:?}"
                    ));
                }
                if granted {
                    for (method, o) in METHOD_OPERATIONS {
                        if o == op.as_str() {
                            grants.insert((caller.clone(), method.to_string()));
                        }
                    }
                }
            }
        }
    }
    // The other direction: what the rules do not grant, the broker refuses.
    let callers: BTreeSet<&String> = grants.iter().map(|(c, _)| c).collect();
    for caller in callers {
        for op in Operation::ALL {
            let granted = grants
                .iter()
                .any(|(c, m)| c == caller && methods_of(op.as_str()).contains(&m.as_str()));
            let id = CallerId::new(caller.as_str());
            let session = "users/x";
            if !granted && policy.decide(&id, op, session, Some(&id)) == Decision::Allow {
                problems.push(format!(
                    "{at}: the broker allows {caller} {op} beyond the rules read"
                ));
            }
        }
    }
    grants
}

/// `spiffe://TD/ns/N/sa/S` → Linkerd's `S.N.serviceaccount.identity.linkerd.TD`.
fn linkerd_twin(spiffe: &str) -> Option<String> {
    let rest = spiffe.strip_prefix("spiffe://")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [domain, "ns", ns, "sa", sa] => Some(format!(
            "{sa}.{ns}.serviceaccount.identity.linkerd.{domain}"
        )),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The checks of one bundle

fn check_bundle(bundle: &Bundle) -> Vec<String> {
    let mut problems = Vec::new();
    let label = &bundle.label;
    let pod = broker_pod(bundle);

    // Every object lands in the broker's namespace (rendered: kustomize set it).
    if bundle.rendered {
        for doc in &bundle.docs {
            if kind(doc) != "Namespace" && s(doc, "/metadata/namespace") != Some("tokenbroker") {
                problems.push(format!(
                    "{label}: {} has no namespace tokenbroker",
                    describe(doc)
                ));
            }
        }
    }

    // Patches aim at objects that exist.
    for (at, kind_, name_) in &bundle.patch_targets {
        if find(bundle, kind_, name_).is_none() {
            problems.push(format!(
                "{label}: {at} patches {kind_} {name_}, which does not exist"
            ));
        }
    }

    // The pod's references: service account, volumes, env sources.
    if let Some(sa) = s(pod.spec, "/serviceAccountName")
        && find(bundle, "ServiceAccount", sa).is_none()
    {
        problems.push(format!("{label}: ServiceAccount {sa} does not exist"));
    }
    for volume in list(pod.spec, "/volumes") {
        let mut refs: Vec<(&str, &str)> = Vec::new();
        refs.extend(s(volume, "/configMap/name").map(|n| ("ConfigMap", n)));
        refs.extend(s(volume, "/secret/secretName").map(|n| ("Secret", n)));
        refs.extend(
            s(volume, "/persistentVolumeClaim/claimName").map(|n| ("PersistentVolumeClaim", n)),
        );
        for source in list(volume, "/projected/sources") {
            refs.extend(s(source, "/configMap/name").map(|n| ("ConfigMap", n)));
            refs.extend(s(source, "/secret/name").map(|n| ("Secret", n)));
        }
        for (kind_, name_) in refs {
            if find(bundle, kind_, name_).is_none() {
                problems.push(format!(
                    "{label}: volume {} uses {kind_} {name_}, which does not exist",
                    volume["name"]
                ));
            }
        }
    }
    for mount in list(pod.container, "/volumeMounts") {
        let volume = s(mount, "/name").unwrap();
        if !list(pod.spec, "/volumes")
            .iter()
            .any(|v| s(v, "/name") == Some(volume))
        {
            problems.push(format!("{label}: mount of undeclared volume {volume}"));
        }
    }

    // Hardening.
    let pod_security = &pod.spec["securityContext"];
    let security = &pod.container["securityContext"];
    for (what, ok) in [
        ("runAsNonRoot", pod_security["runAsNonRoot"] == json!(true)),
        ("runAsUser 65532", pod_security["runAsUser"] == json!(65532)),
        (
            "seccomp RuntimeDefault",
            s(pod_security, "/seccompProfile/type") == Some("RuntimeDefault"),
        ),
        (
            "readOnlyRootFilesystem",
            security["readOnlyRootFilesystem"] == json!(true),
        ),
        (
            "no privilege escalation",
            security["allowPrivilegeEscalation"] == json!(false),
        ),
        (
            "capabilities drop ALL",
            list(security, "/capabilities/drop") == [json!("ALL")],
        ),
        (
            "no service account token",
            pod.spec["automountServiceAccountToken"] == json!(false),
        ),
    ] {
        if !ok {
            problems.push(format!("{label}: the pod lacks {what}"));
        }
    }

    // Services select the pod and target its ports.
    for service in of_kind(bundle, "Service") {
        if !selects(&service["spec"]["selector"], pod.labels, true) {
            problems.push(format!(
                "{label}: {} selects no pod of the workload",
                describe(service)
            ));
        }
        for port in list(service, "/spec/ports") {
            let port_name = s(port, "/name").unwrap_or("");
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            if !pod.has_port(target) {
                problems.push(format!(
                    "{label}: {} port {port_name} targets {target}, no container port",
                    describe(service)
                ));
            }
            if !(port_name == "grpc"
                || port_name.starts_with("grpc-")
                || port_name.starts_with("http-"))
            {
                problems.push(format!(
                    "{label}: {} port {port_name} lacks a grpc-/http- name for the mesh",
                    describe(service)
                ));
            }
        }
    }

    // Probes point at declared container ports; startup and readiness are
    // native gRPC probes on the plaintext health port.
    let health = pod.port_named("grpc-health").cloned();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let Some(spec) = pod.container.get(probe) else {
            problems.push(format!("{label}: no {probe}"));
            continue;
        };
        let port = spec
            .pointer("/grpc/port")
            .or_else(|| spec.pointer("/tcpSocket/port"))
            .or_else(|| spec.pointer("/httpGet/port"));
        match port {
            Some(port) if pod.has_port(port) => {}
            other => problems.push(format!(
                "{label}: {probe} port {other:?} is no container port"
            )),
        }
        if probe != "livenessProbe" {
            let grpc_port = spec.pointer("/grpc/port").and_then(Value::as_i64);
            if grpc_port.is_none() || grpc_port != health.as_ref().map(|p| p.number) {
                problems.push(format!(
                    "{label}: {probe} is not a gRPC probe on the grpc-health port"
                ));
            }
        }
    }

    // The configuration the pod runs with.
    let effective = effective_config(bundle, &pod, &mut problems);
    if let Some(effective) = &effective {
        check_config(bundle, &pod, effective, &mut problems);
    }
    let store = effective.as_ref().map(|e| e.config.store);

    // Replicas and disruption.
    let replicas = pod
        .workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let pdbs: Vec<&Value> = of_kind(bundle, "PodDisruptionBudget").collect();
    for pdb in &pdbs {
        if !selects(&pdb["spec"]["selector"], pod.labels, false) {
            problems.push(format!(
                "{label}: {} selects no pod of the workload",
                describe(pdb)
            ));
        }
        if let Some(min) = pdb.pointer("/spec/minAvailable").and_then(Value::as_i64)
            && min >= replicas
        {
            problems.push(format!(
                "{label}: {} minAvailable {min} with {replicas} replicas blocks every drain",
                describe(pdb)
            ));
        }
    }
    match store {
        Some(StoreKind::Sqlite)
            if replicas != 1 || s(pod.workload, "/spec/strategy/type") != Some("Recreate") =>
        {
            problems.push(format!(
                "{label}: SQLite needs exactly one replica and strategy Recreate"
            ));
        }
        Some(StoreKind::Postgres) => {
            if replicas < 2 {
                problems.push(format!("{label}: HA with {replicas} replica"));
            }
            if pdbs.is_empty() {
                problems.push(format!("{label}: HA without a PodDisruptionBudget"));
            }
            let anti = list(
                pod.spec,
                "/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
            );
            if !anti.iter().any(|t| {
                s(t, "/topologyKey") == Some("kubernetes.io/hostname")
                    && selects(&t["labelSelector"], pod.labels, false)
            }) {
                problems.push(format!(
                    "{label}: HA replicas may share a node (no required anti-affinity on hostname)"
                ));
            }
            if !list(pod.spec, "/topologySpreadConstraints")
                .iter()
                .any(|t| selects(&t["labelSelector"], pod.labels, false))
            {
                problems.push(format!(
                    "{label}: HA without a topology spread over its own pods"
                ));
            }
        }
        _ => {}
    }

    check_network_policies(bundle, &pod, effective.as_ref(), &mut problems);
    check_meshes(bundle, &pod, effective.as_ref(), &mut problems);

    // Prometheus Operator: the ServiceMonitor finds the admin port.
    for monitor in of_kind(bundle, "ServiceMonitor") {
        let services: Vec<&Value> = of_kind(bundle, "Service")
            .filter(|svc| {
                selects(
                    &monitor["spec"]["selector"],
                    &svc["metadata"]["labels"],
                    false,
                )
            })
            .collect();
        if services.is_empty() {
            problems.push(format!("{label}: {} selects no Service", describe(monitor)));
        }
        for endpoint in list(monitor, "/spec/endpoints") {
            let port = s(endpoint, "/port").unwrap_or("");
            let target = services
                .iter()
                .flat_map(|svc| list(svc, "/spec/ports"))
                .find(|p| s(p, "/name") == Some(port));
            let admin = pod.port_named("http-admin");
            match (target, admin) {
                (Some(p), Some(admin))
                    if p.get("targetPort") == Some(&json!(admin.name))
                        || p.get("targetPort") == Some(&json!(admin.number)) => {}
                _ => problems.push(format!(
                    "{label}: {} port {port} does not reach the http-admin container port",
                    describe(monitor)
                )),
            }
            if s(endpoint, "/path") != Some("/metrics") {
                problems.push(format!(
                    "{label}: {} scrapes another path than /metrics",
                    describe(monitor)
                ));
            }
        }
    }
    problems
}

fn check_config(bundle: &Bundle, pod: &Pod, effective: &Effective, problems: &mut Vec<String>) {
    let label = &bundle.label;
    let config = &effective.config;
    // Listen addresses are the container's ports.
    for (key, address, port_name) in [
        ("listen", Some(config.listen), "grpc-api"),
        ("admin_listen", config.admin_listen, "http-admin"),
        ("health_listen", config.health_listen, "grpc-health"),
    ] {
        let Some(address) = address else {
            problems.push(format!("{label}: the configuration sets no {key}"));
            continue;
        };
        if !address.ip().is_unspecified() {
            problems.push(format!(
                "{label}: {key} = {address} is unreachable from outside the pod"
            ));
        }
        if pod.port_named(port_name).map(|p| p.number) != Some(i64::from(address.port())) {
            problems.push(format!(
                "{label}: {key} = {address}, but container port {port_name} is {:?}",
                pod.port_named(port_name)
            ));
        }
    }

    // Drain fits in the grace period.
    let grace = pod.spec["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(30);
    let drain = config.drain_delay_secs + config.shutdown_grace_secs;
    if u64::try_from(grace).unwrap() <= drain {
        problems.push(format!(
            "{label}: terminationGracePeriodSeconds {grace} does not outlast the drain: \
             drain_delay_secs {} + shutdown_grace_secs {}",
            config.drain_delay_secs, config.shutdown_grace_secs
        ));
    }

    // The policy file is mounted, and the broker accepts it.
    match &config.auth.policy_file {
        Some(path) => {
            if let Some(text) = mounted_file(bundle, pod, &path.display().to_string(), problems)
                && let Err(e) = Policy::parse(&text)
            {
                problems.push(format!(
                    "{label}: the broker refuses {}: {e}",
                    path.display()
                ));
            }
        }
        None => problems.push(format!("{label}: no auth.policy_file")),
    }

    // Where the state lives.
    let mounts = list(pod.container, "/volumeMounts");
    let volume_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(s(m, "/mountPath").unwrap()))
            .max_by_key(|m| s(m, "/mountPath").unwrap().len())
            .and_then(|m| {
                list(pod.spec, "/volumes")
                    .iter()
                    .find(|v| v["name"] == m["name"])
            })
    };
    if config.store == StoreKind::Sqlite
        && volume_of(&config.data_dir).is_none_or(|v| v.get("persistentVolumeClaim").is_none())
    {
        problems.push(format!(
            "{label}: SQLite data_dir {} is not on a PersistentVolumeClaim",
            config.data_dir.display()
        ));
    }
    if let Some(key_file) = &config.key_file
        && volume_of(key_file)
            .is_some_and(|v| v.get("secret").is_some() || v.get("projected").is_some())
    {
        problems.push(format!(
            "{label}: key_file {} is on a Secret or projected volume: its files are root's, or 0440 \
             with fsGroup, and the broker refuses a key file others can read; pass the ring in \
             TOKENBROKER_KEYS",
            key_file.display()
        ));
    }
    match &config.keys {
        Some(keys) => {
            if let Err(e) = tokenbroker::store::seal::KeyRing::parse(keys) {
                problems.push(format!(
                    "{label}: the key ring the pod gets is refused: {e}"
                ));
            }
        }
        None if config.store == StoreKind::Postgres => {
            problems.push(format!("{label}: HA replicas without a shared key ring"));
        }
        None => {}
    }
    if !effective.env.contains_key("TOKENBROKER_AUTH__SOURCE") && config.auth.source.is_none() {
        problems.push(format!("{label}: no caller identity source"));
    }
}

fn check_network_policies(
    bundle: &Bundle,
    pod: &Pod,
    effective: Option<&Effective>,
    problems: &mut Vec<String>,
) {
    let label = &bundle.label;
    let linkerd = of_kind(bundle, "Server").next().is_some();
    let policies: Vec<&Value> = of_kind(bundle, "NetworkPolicy").collect();
    if policies.is_empty() {
        problems.push(format!("{label}: no NetworkPolicy"));
    }
    let grpc = pod.port_named("grpc-api").cloned();
    let admin = pod.port_named("http-admin").cloned();
    let is = |reference: &Value, port: &Option<Port>| {
        port.as_ref()
            .is_some_and(|p| reference == &json!(p.name) || reference == &json!(p.number))
    };
    // A client: a labelled pod in a labelled namespace (both, in one peer).
    let client = |peer: &Value| {
        peer.pointer("/podSelector/matchLabels/tokenbroker.io~1client") == Some(&json!("true"))
            && peer.pointer("/namespaceSelector/matchLabels/tokenbroker.io~1clients")
                == Some(&json!("true"))
    };
    let monitoring = |peer: &Value| {
        peer.pointer("/namespaceSelector/matchLabels/kubernetes.io~1metadata.name")
            == Some(&json!("monitoring"))
    };
    let mut egress_ports = BTreeSet::new();
    let mut admitted = BTreeSet::new();
    for policy in &policies {
        if !selects(&policy["spec"]["podSelector"], pod.labels, false) {
            problems.push(format!(
                "{label}: {} selects no pod of the workload",
                describe(policy)
            ));
        }
        for rule in list(policy, "/spec/ingress") {
            let from = list(rule, "/from");
            if list(rule, "/ports").is_empty() {
                problems.push(format!("{label}: {} admits every port", describe(policy)));
            }
            for port in list(rule, "/ports") {
                let reference = &port["port"];
                // Linkerd's proxy takes meshed connections on its own inbound port.
                let proxy = linkerd && reference == &json!(4143);
                let (what, peer_ok): (&str, &dyn Fn(&Value) -> bool) =
                    if is(reference, &grpc) || proxy {
                        ("labelled clients", &client)
                    } else if is(reference, &admin) {
                        ("the monitoring namespace", &monitoring)
                    } else {
                        problems.push(format!(
                            "{label}: {} admits port {reference}, neither gRPC nor metrics",
                            describe(policy)
                        ));
                        continue;
                    };
                if from.is_empty() || !from.iter().all(peer_ok) {
                    problems.push(format!(
                        "{label}: {} admits port {reference} from more than {what}: {from:?}",
                        describe(policy)
                    ));
                }
                admitted.insert(reference.to_string());
            }
        }
        for rule in list(policy, "/spec/egress") {
            for port in list(rule, "/ports") {
                egress_ports.insert(port["port"].as_i64().unwrap_or(0));
            }
        }
    }
    for port in [&grpc, &admin].into_iter().flatten() {
        if !admitted.contains(&json!(port.name).to_string())
            && !admitted.contains(&json!(port.number).to_string())
        {
            problems.push(format!("{label}: no NetworkPolicy admits {}", port.name));
        }
    }
    if linkerd && !admitted.contains("4143") {
        problems.push(format!(
            "{label}: Linkerd, but no NetworkPolicy admits its proxy port 4143"
        ));
    }
    let mut needed = vec![(53, "DNS"), (443, "the IdP")];
    if effective.is_some_and(|e| e.config.store == StoreKind::Postgres) {
        needed.push((5432, "PostgreSQL"));
    }
    for (port, what) in needed {
        if !egress_ports.contains(&port) {
            problems.push(format!(
                "{label}: no NetworkPolicy lets the broker reach {what} (port {port})"
            ));
        }
    }
}

fn check_meshes(
    bundle: &Bundle,
    pod: &Pod,
    effective: Option<&Effective>,
    problems: &mut Vec<String>,
) {
    let label = &bundle.label;
    let source = effective.and_then(|e| e.env.get("TOKENBROKER_AUTH__SOURCE").cloned());
    let policy_text = match effective.and_then(|e| e.config.auth.policy_file.clone()) {
        Some(path) => mounted_file(bundle, pod, &path.display().to_string(), &mut Vec::new()),
        None => None,
    };
    let grants = policy_text
        .as_deref()
        .map(|text| policy_grants(text, label, problems))
        .unwrap_or_default();
    let methods = proto_methods();
    let grpc_port = pod.port_named("grpc-api").map(|p| p.number).unwrap_or(0);
    let bypass: BTreeSet<String> = ["grpc-health", "http-admin"]
        .iter()
        .filter_map(|n| pod.port_named(n))
        .map(|p| p.number.to_string())
        .collect();
    let annotation = |key: &str| -> Option<String> {
        pod.workload
            .pointer("/spec/template/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    // The sidecar keeps forwarding until the broker's drain is over.
    let drain = effective.map(|e| e.config.drain_delay_secs + e.config.shutdown_grace_secs);
    let outlives = |what: &str, hold: Option<u64>, problems: &mut Vec<String>| {
        if let Some(drain) = drain
            && hold.is_none_or(|hold| hold <= drain)
        {
            problems.push(format!(
                "{label}: {what} ({hold:?} s) does not outlast the broker's drain ({drain} s)"
            ));
        }
    };
    let bypassed = |value: Option<String>| -> bool {
        let listed: BTreeSet<String> = value
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_string())
            .collect();
        bypass.is_subset(&listed)
    };

    // Each rule of the policy names each caller in both mesh forms.
    if let Some(text) = &policy_text {
        let table: toml::Table = toml::from_str(text).unwrap();
        for (index, rule) in table
            .get("rules")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let callers: BTreeSet<String> = rule["callers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            let spiffe: BTreeSet<String> = callers.iter().filter_map(|c| linkerd_twin(c)).collect();
            let linkerd: BTreeSet<String> = callers
                .iter()
                .filter(|c| !c.starts_with("spiffe://"))
                .cloned()
                .collect();
            if spiffe != linkerd {
                problems.push(format!(
                    "{label}: policy rules[{index}] does not name each caller in both forms: its SPIFFE ids \
                     are, as Linkerd identities, {spiffe:?}; its Linkerd identities are {linkerd:?}"
                ));
            }
        }
    }

    let istio = of_kind(bundle, "AuthorizationPolicy")
        .any(|d| s(d, "/apiVersion").is_some_and(|v| v.starts_with("security.istio.io")));
    let linkerd = of_kind(bundle, "Server").next().is_some();
    match (istio, linkerd) {
        (true, false) => {
            if source.as_deref() != Some("xfcc") {
                problems.push(format!(
                    "{label}: Istio, but auth.source is {source:?}, not xfcc"
                ));
            }
            if bundle.rendered {
                let inject = pod
                    .workload
                    .pointer("/spec/template/metadata/labels/sidecar.istio.io~1inject");
                if inject != Some(&json!("true")) {
                    problems.push(format!(
                        "{label}: the pod does not ask for the Istio sidecar"
                    ));
                }
                let hold = annotation("proxy.istio.io/config").and_then(|config| {
                    config.lines().find_map(|line| {
                        let value = line.trim().strip_prefix("terminationDrainDuration:")?;
                        value.trim().strip_suffix('s')?.parse().ok()
                    })
                });
                outlives("the Istio terminationDrainDuration", hold, problems);
                if !bypassed(annotation("traffic.sidecar.istio.io/excludeInboundPorts")) {
                    problems.push(format!(
                        "{label}: the sidecar captures the probe or metrics port ({bypass:?})"
                    ));
                }
            }
            let strict = of_kind(bundle, "PeerAuthentication").any(|pa| {
                selects(&pa["spec"]["selector"], pod.labels, false)
                    && s(pa, "/spec/mtls/mode") == Some("STRICT")
            });
            if !strict {
                problems.push(format!(
                    "{label}: no STRICT PeerAuthentication selects the pod"
                ));
            }
            let mut allowed = BTreeSet::new();
            for ap in of_kind(bundle, "AuthorizationPolicy") {
                if !selects(&ap["spec"]["selector"], pod.labels, false) {
                    problems.push(format!(
                        "{label}: {} selects no pod of the workload",
                        describe(ap)
                    ));
                }
                if s(ap, "/spec/action").unwrap_or("ALLOW") != "ALLOW" {
                    continue;
                }
                for (index, rule) in list(ap, "/spec/rules").iter().enumerate() {
                    let at = format!("{label}: {} rules[{index}]", describe(ap));
                    let principals: Vec<&str> = list(rule, "/from")
                        .iter()
                        .flat_map(|f| list(f, "/source/principals"))
                        .filter_map(Value::as_str)
                        .collect();
                    let operations: Vec<&Value> =
                        list(rule, "/to").iter().map(|t| &t["operation"]).collect();
                    if principals.is_empty() || operations.is_empty() || rule.get("when").is_some()
                    {
                        problems.push(format!("{at}: every rule names principals and operations (no when), or it opens more than the policy"));
                    }
                    for op in operations {
                        let ports: Vec<&str> = list(op, "/ports")
                            .iter()
                            .filter_map(Value::as_str)
                            .collect();
                        if ports != [grpc_port.to_string()] {
                            problems.push(format!(
                                "{at}: ports {ports:?}, not the gRPC container port {grpc_port}"
                            ));
                        }
                        let paths: Vec<&str> = list(op, "/paths")
                            .iter()
                            .filter_map(Value::as_str)
                            .collect();
                        if paths.is_empty() {
                            problems.push(format!("{at}: no paths: every method"));
                        }
                        for path in paths {
                            let method = path
                                .strip_prefix(&format!("/{SERVICE}/"))
                                .filter(|m| methods.contains(*m));
                            let Some(method) = method else {
                                problems.push(format!(
                                    "{at}: {path} is no method of {SERVICE} in broker.proto"
                                ));
                                continue;
                            };
                            for principal in &principals {
                                allowed
                                    .insert((format!("spiffe://{principal}"), method.to_string()));
                            }
                        }
                    }
                }
            }
            let expected: BTreeSet<(String, String)> = grants
                .iter()
                .filter(|(c, _)| c.starts_with("spiffe://"))
                .cloned()
                .collect();
            if allowed != expected {
                problems.push(format!(
                    "{label}: the Istio AuthorizationPolicy allows {:?} beyond the broker policy and misses {:?}",
                    allowed.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&allowed).collect::<Vec<_>>()
                ));
            }
            // The IdP hosts are registered for REGISTRY_ONLY meshes.
            let hosts: BTreeSet<&str> = of_kind(bundle, "ServiceEntry")
                .flat_map(|se| list(se, "/spec/hosts"))
                .filter_map(Value::as_str)
                .collect();
            if let Some(effective) = effective {
                for provider in effective.config.providers.values() {
                    let host = provider
                        .token_url
                        .split("://")
                        .nth(1)
                        .and_then(|r| r.split(['/', ':']).next())
                        .unwrap_or("");
                    if !hosts.contains(host) {
                        problems.push(format!("{label}: no ServiceEntry for the IdP host {host}"));
                    }
                }
            }
        }
        (false, true) => {
            if source.as_deref() != Some("linkerd") {
                problems.push(format!(
                    "{label}: Linkerd, but auth.source is {source:?}, not linkerd"
                ));
            }
            if bundle.rendered {
                if annotation("linkerd.io/inject").as_deref() != Some("enabled") {
                    problems.push(format!(
                        "{label}: the pod does not ask for the Linkerd proxy"
                    ));
                }
                let hold = annotation("config.alpha.linkerd.io/proxy-wait-before-exit-seconds")
                    .and_then(|v| v.parse().ok());
                outlives("the Linkerd proxy-wait-before-exit-seconds", hold, problems);
                if !bypassed(annotation("config.linkerd.io/skip-inbound-ports")) {
                    problems.push(format!(
                        "{label}: the proxy captures the probe or metrics port ({bypass:?})"
                    ));
                }
            }
            let mut identities = BTreeSet::new();
            for server in of_kind(bundle, "Server") {
                if !selects(&server["spec"]["podSelector"], pod.labels, false) {
                    problems.push(format!(
                        "{label}: {} selects no pod of the workload",
                        describe(server)
                    ));
                }
                if server["spec"]["port"] != json!("grpc-api")
                    && server["spec"]["port"] != json!(grpc_port)
                {
                    problems.push(format!(
                        "{label}: {} is not on the gRPC port",
                        describe(server)
                    ));
                }
                if s(server, "/spec/proxyProtocol") != Some("gRPC") {
                    problems.push(format!(
                        "{label}: {} is not proxyProtocol gRPC",
                        describe(server)
                    ));
                }
                let authorizations: Vec<&Value> = of_kind(bundle, "AuthorizationPolicy")
                    .filter(|ap| {
                        s(ap, "/spec/targetRef/kind") == Some("Server")
                            && s(ap, "/spec/targetRef/name") == Some(name(server))
                    })
                    .collect();
                if authorizations.is_empty() {
                    problems.push(format!(
                        "{label}: no AuthorizationPolicy for {}",
                        describe(server)
                    ));
                }
                for ap in authorizations {
                    let refs = list(ap, "/spec/requiredAuthenticationRefs");
                    if refs.is_empty() {
                        problems.push(format!(
                            "{label}: {} requires no authentication",
                            describe(ap)
                        ));
                    }
                    for authn in refs {
                        let authn_kind = s(authn, "/kind").unwrap_or("");
                        match find(bundle, authn_kind, s(authn, "/name").unwrap_or("")) {
                            Some(doc) if authn_kind == "MeshTLSAuthentication" => {
                                identities.extend(
                                    list(doc, "/spec/identities")
                                        .iter()
                                        .filter_map(Value::as_str)
                                        .map(str::to_string),
                                );
                            }
                            Some(doc) => problems.push(format!(
                                "{label}: {} accepts {}: not mesh mTLS",
                                describe(ap),
                                describe(doc)
                            )),
                            None => problems.push(format!(
                                "{label}: {} requires {authn}, which does not exist",
                                describe(ap)
                            )),
                        }
                    }
                }
            }
            let expected: BTreeSet<String> = grants
                .iter()
                .map(|(c, _)| c)
                .filter(|c| !c.starts_with("spiffe://"))
                .cloned()
                .collect();
            if identities != expected {
                problems.push(format!(
                    "{label}: Linkerd lets {:?} in beyond the broker policy's callers and misses {:?}",
                    identities.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&identities).collect::<Vec<_>>()
                ));
            }
        }
        (false, false) => problems.push(format!("{label}: no mesh policy")),
        (true, true) => problems.push(format!("{label}: both Istio and Linkerd policies")),
    }
}

fn report(problems: &[String]) {
    if !problems.is_empty() {
        let mut text = String::new();
        for problem in problems {
            writeln!(text, "- {problem}").unwrap();
        }
        panic!("{} problem(s):\n{text}", problems.len());
    }
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn every_yaml_document_under_deploy_parses() {
    let files = yaml_files(&deploy());
    assert!(files.len() >= 20, "the manifests are found: {files:?}");
    let mut problems = Vec::new();
    let mut count = 0;
    for file in &files {
        for doc in read_yaml(file) {
            count += 1;
            if !file.starts_with(kube()) {
                continue;
            }
            let at = file.strip_prefix(root()).unwrap().display();
            if s(&doc, "/apiVersion").is_none() || kind(&doc).is_empty() {
                problems.push(format!("{at}: a document without apiVersion and kind"));
            }
            let kustomize = matches!(kind(&doc), "Kustomization" | "Component");
            if !kustomize && name(&doc).is_empty() {
                problems.push(format!("{at}: {} without metadata.name", kind(&doc)));
            }
        }
    }
    assert!(count >= files.len());
    report(&problems);
}

#[test]
fn kustomizations_name_files_that_exist_and_use_every_manifest() {
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    let kustomizations: Vec<PathBuf> = yaml_files(&kube())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .collect();
    assert!(kustomizations.len() >= 6, "{kustomizations:?}");
    for k in &kustomizations {
        problems.extend(check_kustomization_paths(k.parent().unwrap(), &mut used));
    }
    for file in yaml_files(&kube()) {
        let canonical = file.canonicalize().unwrap();
        if file.file_name().is_some_and(|n| n != "kustomization.yaml") && !used.contains(&canonical)
        {
            problems.push(format!(
                "{} is in no kustomization",
                file.strip_prefix(root()).unwrap().display()
            ));
        }
    }
    report(&problems);
}

#[test]
fn overlays_hold_together_from_their_sources() {
    let mut problems = Vec::new();
    for overlay in OVERLAYS {
        for mesh in MESHES {
            problems.extend(check_bundle(&source_bundle(overlay, mesh)));
        }
    }
    report(&problems);
}

#[test]
fn overlays_hold_together_as_kustomize_renders_them() {
    if !kubectl_kustomize_available() {
        eprintln!(
            "kubectl not found: the rendered overlays are not checked (the source checks still run)"
        );
        return;
    }
    let mut problems = Vec::new();
    for overlay in OVERLAYS {
        for mesh in MESHES {
            problems.extend(check_bundle(&rendered_bundle(overlay, mesh)));
        }
    }
    report(&problems);
}

#[test]
fn the_policy_operations_cover_every_grpc_method() {
    let methods = proto_methods();
    let mapped: BTreeSet<String> = METHOD_OPERATIONS
        .iter()
        .map(|(m, _)| m.to_string())
        .collect();
    assert_eq!(
        methods, mapped,
        "broker.proto's methods and the operation of each"
    );
    for (_, op) in METHOD_OPERATIONS {
        operation(op);
    }
}

#[test]
fn secret_examples_are_placeholders_the_broker_refuses() {
    for overlay in OVERLAYS {
        let dir = kube().join("overlays").join(overlay).join("secrets");
        let keys = std::fs::read_to_string(dir.join("keys.example")).unwrap();
        assert!(keys.contains("REPLACE_ME"));
        assert!(
            tokenbroker::store::seal::KeyRing::parse(&keys).is_err(),
            "overlays/{overlay}/secrets/keys.example must not be a usable key ring"
        );
    }
    let env =
        std::fs::read_to_string(kube().join("overlays/ha/secrets/postgres.env.example")).unwrap();
    let url = env.lines().find_map(|l| l.strip_prefix("url=")).unwrap();
    let vars = [
        ("TOKENBROKER_STORE".to_string(), "postgres".to_string()),
        ("TOKENBROKER_POSTGRES__URL".to_string(), url.to_string()),
        ("TOKENBROKER_KEYS".to_string(), test_secret("keys").unwrap()),
        ("TOKENBROKER_AUTH__SOURCE".to_string(), "none".to_string()),
    ];
    let config = Config::load(None, vars).unwrap();
    let refused = config.validate().unwrap_err();
    assert_eq!(refused.key, "postgres.url", "{refused}");
    let ignore = std::fs::read_to_string(kube().join(".gitignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "overlays/*/secrets/*"),
        "the real secrets are gitignored"
    );
}

/// Metric names (base names) that the code describes as histograms.
fn histograms() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let mut constants = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("pub const ")
            && let Some((ident, value)) = rest.split_once(": &str = ")
        {
            constants.insert(
                ident.to_string(),
                value.trim_end_matches(';').trim_matches('"').to_string(),
            );
        }
    }
    text.split("describe_histogram!(")
        .skip(1)
        .map(|rest| {
            let ident: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            constants
                .get(&ident)
                .unwrap_or_else(|| panic!("histogram {ident} is no constant"))
                .clone()
        })
        .collect()
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query", Value::String(text)) => out.push(text.clone()),
                    _ => exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_exported_metrics_and_shows_them_all() {
    let path = deploy().join("grafana/tokenbroker.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    assert!(!list(&dashboard, "/panels").is_empty());
    let exported: BTreeSet<&str> = tokenbroker::metrics::ALL.iter().copied().collect();
    let histograms = histograms();
    assert!(
        histograms.len() >= 4,
        "histograms found in src/metrics.rs: {histograms:?}"
    );
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let mut problems = Vec::new();
    let mut shown = BTreeSet::new();
    for query in &queries {
        let mut rest = query.as_str();
        while let Some(at) = rest.find("tokenbroker_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let series = &tail[..end];
            rest = &tail[end..];
            let histogram = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| series.strip_suffix(suffix))
                .filter(|base| histograms.contains(*base));
            let base = histogram.unwrap_or(series);
            if !exported.contains(base) {
                problems.push(format!(
                    "{series} (in {query}) is no metric of tokenbroker::metrics::ALL"
                ));
            } else if histogram.is_none() && histograms.contains(base) {
                problems.push(format!(
                    "{series} is a histogram: query its _bucket, _sum or _count (in {query})"
                ));
            }
            shown.insert(base.to_string());
        }
    }
    for metric in exported {
        if !shown.contains(metric) {
            problems.push(format!("no panel shows {metric}"));
        }
    }
    report(&problems);
}

#[test]
fn dockerfile_exposes_the_container_ports_and_runs_as_the_pods_user() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let exposed: BTreeSet<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(|p| p.parse::<i64>().unwrap()))
        .collect();
    for overlay in OVERLAYS {
        let bundle = source_bundle(overlay, MESHES[0]);
        let pod = broker_pod(&bundle);
        let ports: BTreeSet<i64> = pod.ports.iter().map(|p| p.number).collect();
        assert_eq!(
            exposed, ports,
            "EXPOSE and the container ports of {overlay}"
        );
        assert_eq!(pod.spec["securityContext"]["runAsUser"], json!(65532));
    }
    assert!(text.lines().any(|l| l.trim() == "USER 65532:65532"));
    assert!(text.contains("cargo build --release --locked"));
    let last_from = text.lines().rfind(|l| l.starts_with("FROM ")).unwrap();
    assert!(
        last_from.contains("distroless") && last_from.contains("nonroot"),
        "{last_from}"
    );
}

#[test]
fn prometheus_scrape_config_keeps_the_admin_port_of_the_broker_pods() {
    let config = read_yaml(&deploy().join("prometheus/scrape-config.yaml")).remove(0);
    let job = &list(&config, "/scrape_configs")[0];
    let keeps: BTreeMap<&str, &str> = list(job, "/relabel_configs")
        .iter()
        .filter(|r| s(r, "/action") == Some("keep"))
        .map(|r| {
            (
                s(&r["source_labels"][0], "").unwrap(),
                s(r, "/regex").unwrap(),
            )
        })
        .collect();
    let bundle = source_bundle(OVERLAYS[0], MESHES[0]);
    let pod = broker_pod(&bundle);
    let admin = pod.port_named("http-admin").expect("an admin port");
    assert_eq!(
        keeps["__meta_kubernetes_pod_container_port_name"],
        admin.name
    );
    let app = keeps["__meta_kubernetes_pod_label_app_kubernetes_io_name"];
    assert_eq!(pod.labels["app.kubernetes.io/name"], json!(app));
    assert_eq!(s(job, "/metrics_path"), Some("/metrics"));
}
