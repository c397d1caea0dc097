//! Writes an [`Mlp`] and its [`Normalizer`] as an ONNX model.
//!
//! The protobuf messages below are the subset of `onnx.proto` (field numbers as upstream) that
//! a feed-forward network needs; writing them directly avoids a protoc build step.
//!
//! Graph (opset 13): `features [N, F]` -> Sub(mean) -> Div(std) -> (Gemm -> Relu)* -> Gemm
//! -> Clip(0, cap) -> `rul_cycles [N, 1]`. Normalisation lives in the graph so the constants
//! travel with the model and the agent only computes raw features.

use prost::Message;

use crate::mlp::{Mlp, Normalizer};

/// Input tensor name.
pub const INPUT: &str = "features";
/// Output tensor name.
pub const OUTPUT: &str = "rul_cycles";

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

const FLOAT: i32 = 1;

fn tensor(name: &str, dims: &[usize], data: impl IntoIterator<Item = f32>) -> TensorProto {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        float_data: data.into_iter().collect(),
        name: name.to_owned(),
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        name: format!("{op}_{output}"),
        op_type: op.to_owned(),
    }
}

fn value_info(name: &str, width: usize) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        Dimension {
                            dim_value: None,
                            dim_param: Some("batch".into()),
                        },
                        Dimension {
                            dim_value: Some(width as i64),
                            dim_param: None,
                        },
                    ],
                }),
            }),
        }),
    }
}

/// Encodes the model; `metadata` lands in the model's `metadata_props` (feature set id and
/// document, model version, ...), readable by any ONNX runtime.
///
/// With several networks (an ensemble) every member reads the same normalised input and the
/// output is their mean: `Sum(z_m0, z_m1, ...) * (1/k)` before the clip. A single network gives
/// exactly the graph kip has always written.
pub fn export(
    nets: &[Mlp],
    norm: &Normalizer,
    clip_max: f32,
    metadata: &[(&str, String)],
) -> Vec<u8> {
    let inputs = norm.mean.len();
    let mut init = vec![
        tensor("norm_mean", &[inputs], norm.mean.iter().copied()),
        tensor("norm_std", &[inputs], norm.std.iter().copied()),
        tensor("clip_min", &[], [0.0]),
        tensor("clip_max", &[], [clip_max]),
    ];
    let mut nodes = vec![
        node("Sub", &[INPUT, "norm_mean"], "centred"),
        node("Div", &["centred", "norm_std"], "h0"),
    ];
    let mut member_outputs = Vec::with_capacity(nets.len());
    for (m, net) in nets.iter().enumerate() {
        let prefix = if nets.len() == 1 {
            String::new()
        } else {
            format!("m{m}_")
        };
        let last = net.layers.len().saturating_sub(1);
        let mut prev = "h0".to_owned();
        for (i, l) in net.layers.iter().enumerate() {
            let (w, b) = (format!("{prefix}w{i}"), format!("{prefix}b{i}"));
            init.push(tensor(&w, &[l.w.nrows(), l.w.ncols()], l.w.iter().copied()));
            init.push(tensor(&b, &[l.b.len()], l.b.iter().copied()));
            let z = format!("{prefix}z{i}");
            nodes.push(node("Gemm", &[&prev, &w, &b], &z));
            if i < last {
                let a = format!("{prefix}a{i}");
                nodes.push(node("Relu", &[&z], &a));
                prev = a;
            } else {
                prev = z;
            }
        }
        member_outputs.push(prev);
    }
    let prev = if member_outputs.len() == 1 {
        member_outputs.pop().unwrap_or_default()
    } else {
        let refs: Vec<&str> = member_outputs.iter().map(String::as_str).collect();
        nodes.push(node("Sum", &refs, "ensemble_sum"));
        init.push(tensor(
            "ensemble_weight",
            &[],
            [1.0 / member_outputs.len().max(1) as f32],
        ));
        nodes.push(node(
            "Mul",
            &["ensemble_sum", "ensemble_weight"],
            "ensemble_mean",
        ));
        "ensemble_mean".to_owned()
    };
    nodes.push(node("Clip", &[&prev, "clip_min", "clip_max"], OUTPUT));
    let model = ModelProto {
        ir_version: 8,
        producer_name: "kip-ml".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: "ai.kip".into(),
        model_version: 1,
        doc_string: "kip remaining-useful-life MLP (ensemble mean when several)".into(),
        graph: Some(GraphProto {
            node: nodes,
            name: "kip_rul".into(),
            initializer: init,
            input: vec![value_info(INPUT, inputs)],
            output: vec![value_info(OUTPUT, 1)],
        }),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: (*k).to_owned(),
                value: v.clone(),
            })
            .collect(),
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_round_trips_through_the_protobuf_decoder() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let net = Mlp::new(3, &[4], &mut rng);
        let norm = Normalizer {
            mean: ndarray::arr1(&[0.0, 1.0, 2.0]),
            std: ndarray::arr1(&[1.0, 1.0, 1.0]),
        };
        let bytes = export(
            std::slice::from_ref(&net),
            &norm,
            125.0,
            &[("feature_set", "x".into())],
        );
        let m = ModelProto::decode(bytes.as_slice()).unwrap();
        let g = m.graph.unwrap();
        let ops: Vec<_> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Sub", "Div", "Gemm", "Relu", "Gemm", "Clip"]);
        assert_eq!(
            g.initializer.iter().find(|t| t.name == "w0").unwrap().dims,
            vec![3, 4]
        );
        assert_eq!(m.metadata_props[0].value, "x");

        // Two members: two chains on the same normalised input, averaged before the clip.
        let other = Mlp::new(3, &[4], &mut rng);
        let bytes = export(&[net, other], &norm, 125.0, &[]);
        let g = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
        let ops: Vec<_> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Sub", "Div", "Gemm", "Relu", "Gemm", "Gemm", "Relu", "Gemm", "Sum", "Mul", "Clip"
            ]
        );
        assert!(g.initializer.iter().any(|t| t.name == "m1_w0"));
    }
}
