//! Admission: what the runner must be able to do with an applied object, checked before the
//! change is accepted, so a change it cannot carry out is refused whole and never stored (where
//! it would fail every later change).
//!
//! The control plane already checks what any cluster would (namespaces, service accounts, named
//! ports); here, what only this runner knows: `nodeName` must name one of the mesh's nodes, and
//! every container must have a program to run (images are not pulled: `command` names a program
//! on this host, or the image is the built-in `ambit/echo`).

use ambit_local::manifest::{Object, PodSpec};

/// The image the runner provides itself.
pub const ECHO_IMAGE: &str = "ambit/echo";

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{object}: spec.nodeName {node:?} is not a node of this mesh (its nodes: {nodes}); nothing was applied")]
    UnknownNode {
        object: String,
        node: String,
        nodes: String,
    },
    #[error("{object}: container {container:?} (image {image}) has no command; images are not pulled here: give `command` (a program on this host) or use image ambit/echo; nothing was applied")]
    NoCommand {
        object: String,
        container: String,
        image: String,
    },
}

/// Checks every Pod and Deployment template in `objects` against this runner's `nodes`.
pub fn check(objects: &[Object], nodes: &[String]) -> Result<(), AdmitError> {
    for object in objects {
        let spec = match object {
            Object::Pod(pod) => &pod.spec,
            Object::Deployment(deployment) => &deployment.spec.template.spec,
            _ => continue,
        };
        check_spec(&object.object_ref().to_string(), spec, nodes)?;
    }
    Ok(())
}

fn check_spec(object: &str, spec: &PodSpec, nodes: &[String]) -> Result<(), AdmitError> {
    if let Some(node) = &spec.node_name {
        if !nodes.contains(node) {
            return Err(AdmitError::UnknownNode {
                object: object.to_owned(),
                node: node.clone(),
                nodes: nodes.join(", "),
            });
        }
    }
    for container in &spec.containers {
        if container.image != ECHO_IMAGE
            && container.command.is_empty()
            && container.args.is_empty()
        {
            return Err(AdmitError::NoCommand {
                object: object.to_owned(),
                container: container.name.clone(),
                image: container.image.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(text: &str) -> Vec<Object> {
        ambit_local::manifest::parse(text).unwrap()
    }

    #[test]
    fn unknown_nodes_and_missing_commands_are_refused_by_name() {
        let nodes = vec!["node1".to_owned(), "node2".to_owned()];
        let pod = |spec: &str| {
            objects(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: n}}\nspec:\n{spec}"
            ))
        };
        let err = check(
            &pod("  nodeName: node9\n  containers: [{name: c, image: ambit/echo}]\n"),
            &nodes,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("node9") && err.contains("node1, node2"),
            "{err}"
        );
        let err = check(&pod("  containers: [{name: web, image: nginx}]\n"), &nodes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"web\"") && err.contains("nginx"), "{err}");
        check(
            &pod("  nodeName: node2\n  containers: [{name: c, image: x, command: [sleep, '9']}]\n"),
            &nodes,
        )
        .unwrap();
        let deployment = objects(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {nodeName: node3, containers: [{name: c, image: ambit/echo}]}\n",
        );
        assert!(check(&deployment, &nodes).is_err());
    }
}
