//! The adapter being trained: decoder layers whose weights live in a `VarMap`, so candle's autograd
//! tracks them. The input and output submodels stay plain tensors, frozen.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use hat_model::{names, Config, Submodel, SubmodelKind};
use hat_runtime::draft::ADAPTER_BIAS;
use hat_runtime::{Adapter, AdapterOrigin};

use crate::error::{Result, TrainError};

pub struct TrainableAdapter {
    varmap: VarMap,
    pub layers: Submodel,
    /// Added to the layers' output.
    pub bias: Var,
    cfg: Config,
}

impl std::fmt::Debug for TrainableAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrainableAdapter({} layers)", self.num_layers())
    }
}

/// `model.layers.{i}.` + suffix.
fn layer_name(i: usize, suffix: &str) -> String {
    format!("{}.{i}.{suffix}", names::LAYERS_PREFIX)
}

impl TrainableAdapter {
    /// `num_layers` layers, each a copy of the decoder layer stored in `init_file` (the package's
    /// `adapter-init.safetensors`, or a trained adapter's first layer), and the output bias set to
    /// `bias`.
    pub fn from_init(init_file: &Path, cfg: &Config, num_layers: usize, bias: &Tensor, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(init_file, &Device::Cpu)?;
        let first = tensors
            .keys()
            .filter_map(|n| names::layer_index(n))
            .min()
            .ok_or_else(|| TrainError::BadInput(format!("{} holds no decoder layer", init_file.display())))?;
        let prefix = format!("{}.{first}.", names::LAYERS_PREFIX);
        let mut out = HashMap::new();
        for (name, t) in &tensors {
            if let Some(suffix) = name.strip_prefix(&prefix) {
                for i in 0..num_layers {
                    out.insert(layer_name(i, suffix), t.to_dtype(DType::F32)?.to_device(device)?);
                }
            }
        }
        out.insert(ADAPTER_BIAS.to_string(), bias.to_dtype(DType::F32)?);
        Self::from_tensors(out, cfg, num_layers, device)
    }

    /// Layers `0..num_layers` from tensors named `model.layers.{i}.*`, and the bias.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, cfg: &Config, num_layers: usize, device: &Device) -> Result<Self> {
        if !tensors.contains_key(ADAPTER_BIAS) {
            return Err(TrainError::Checkpoint(format!("no `{ADAPTER_BIAS}` among the adapter tensors")));
        }
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().map_err(|_| TrainError::BadInput("var map lock poisoned".into()))?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t.to_device(device)?)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let layers = Submodel::load(vb.clone(), &cfg.for_draft(), SubmodelKind::Middle, 0..num_layers)?;
        let bias = {
            let data = varmap.data().lock().map_err(|_| TrainError::BadInput("var map lock poisoned".into()))?;
            data.get(ADAPTER_BIAS).cloned().ok_or_else(|| TrainError::Checkpoint(format!("no `{ADAPTER_BIAS}`")))?
        };
        Ok(Self { varmap, layers, bias, cfg: cfg.clone() })
    }

    /// The adapter's output, differentiably (training).
    ///
    /// # Shapes
    /// x: (1, seq, hidden) -> (1, seq, hidden)
    pub fn forward_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.layers.forward_differentiable(x)?.broadcast_add(self.bias.as_tensor())?)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.layer_range().len()
    }

    /// (name, variable) pairs in a stable order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        crate::train::sorted_vars(&self.varmap)
    }

    /// Current weights, detached, on the CPU.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.vars().into_iter().map(|(k, v)| Ok((k, v.as_tensor().detach().to_device(&Device::Cpu)?))).collect()
    }

    /// A copy for inference (on the CPU), for evaluation.
    pub fn to_runtime(&self, origin: AdapterOrigin) -> Result<Adapter> {
        let tensors = self.tensors()?;
        let bias = tensors.get(ADAPTER_BIAS).cloned();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let layers = Submodel::load(vb, &self.cfg.for_draft(), SubmodelKind::Middle, 0..self.num_layers())?;
        let adapter = Adapter::from_submodel(layers, origin);
        Ok(match bias {
            Some(b) => adapter.with_bias(b),
            None => adapter,
        })
    }
}
