//! A small multi-layer perceptron (ReLU hidden layers, linear output) trained with Adam on
//! mean squared error, plus the z-score normaliser of its inputs.
//!
//! Small on purpose: a gateway runs it per machine and window, and a batch-1 inference must
//! stay far below a millisecond. Deterministic: initialisation and shuffling come from one
//! seeded RNG, and the arithmetic order does not depend on threads.

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::SliceRandom as _};

/// One fully connected layer: `y = x · w + b`, `w` is `[inputs, outputs]`.
#[derive(Debug, Clone)]
pub struct Dense {
    pub w: Array2<f32>,
    pub b: Array1<f32>,
}

/// Per-feature z-score normalisation: `(x - mean) / std`.
#[derive(Debug, Clone)]
pub struct Normalizer {
    pub mean: Array1<f32>,
    pub std: Array1<f32>,
}

impl Normalizer {
    /// Fits mean and standard deviation per column; constant columns get `std = 1`.
    pub fn fit(x: ArrayView2<f32>) -> Self {
        let n = x.nrows().max(1) as f64;
        let cols = x.ncols();
        let mut mean = Array1::<f32>::zeros(cols);
        let mut std = Array1::<f32>::ones(cols);
        for c in 0..cols {
            let col = x.column(c);
            let m = col.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = col.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / n;
            mean[c] = m as f32;
            let sd = var.sqrt() as f32;
            std[c] = if sd > 1e-6 { sd } else { 1.0 };
        }
        Self { mean, std }
    }

    pub fn apply(&self, x: ArrayView2<f32>) -> Array2<f32> {
        (&x - &self.mean) / &self.std
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    /// L2 penalty on weights (not biases).
    pub weight_decay: f32,
    pub seed: u64,
    /// Targets are divided by this during training (and the last layer scaled back after), so
    /// the optimiser sees values near 1.
    pub target_scale: f32,
}

/// The network: hidden layers with ReLU, then a linear output layer of width 1.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Dense>,
}

fn he_init(rng: &mut StdRng, fan_in: usize, fan_out: usize) -> Array2<f32> {
    let sd = (2.0 / fan_in as f32).sqrt();
    Array2::from_shape_fn((fan_in, fan_out), |_| {
        // Box-Muller: two uniforms -> one standard normal.
        let u1: f32 = rng.random::<f32>().max(1e-7);
        let u2: f32 = rng.random::<f32>();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    })
}

impl Mlp {
    pub fn new(inputs: usize, hidden: &[usize], rng: &mut StdRng) -> Self {
        let mut layers = Vec::new();
        let mut fan_in = inputs;
        for &h in hidden.iter().chain(std::iter::once(&1)) {
            layers.push(Dense {
                w: he_init(rng, fan_in, h),
                b: Array1::zeros(h),
            });
            fan_in = h;
        }
        Self { layers }
    }

    /// Forward pass on already normalised inputs; returns `[rows, 1]`.
    pub fn forward(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut a = x.to_owned();
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            a = a.dot(&l.w) + &l.b;
            if i < last {
                a.mapv_inplace(|v| v.max(0.0));
            }
        }
        a
    }

    pub fn parameter_count(&self) -> usize {
        self.layers.iter().map(|l| l.w.len() + l.b.len()).sum()
    }

    /// Trains on normalised `x` and targets `y`; returns the mean training loss per epoch
    /// (in scaled units).
    pub fn train(x: ArrayView2<f32>, y: &[f32], cfg: &TrainConfig) -> (Self, Vec<f32>) {
        Self::train_observed(x, y, cfg, &mut |_, _, _| {})
    }

    /// [`Mlp::train`], calling `on_epoch(epoch, net, mean loss)` after each epoch. `net`'s
    /// output is in scaled units (multiply by `cfg.target_scale`); the observer cannot change
    /// the training (it sees the network, not the random state), so a run is reproducible
    /// whatever it does.
    pub fn train_observed(
        x: ArrayView2<f32>,
        y: &[f32],
        cfg: &TrainConfig,
        on_epoch: &mut dyn FnMut(usize, &Mlp, f32),
    ) -> (Self, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut net = Self::new(x.ncols(), &cfg.hidden, &mut rng);
        let mut adam = Adam::new(&net);
        let mut order: Vec<usize> = (0..x.nrows()).collect();
        let mut losses = Vec::with_capacity(cfg.epochs);
        let scale = cfg.target_scale.max(1e-6);
        let mut step = 0u32;
        for epoch in 0..cfg.epochs {
            order.shuffle(&mut rng);
            // Cosine decay to 5% of the initial rate: large steps early, fine ones at the end.
            let progress = epoch as f32 / cfg.epochs.max(1) as f32;
            let lr = cfg.learning_rate
                * (0.05 + 0.95 * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()));
            let mut total = 0f64;
            for chunk in order.chunks(cfg.batch_size.max(1)) {
                let xb = x.select(Axis(0), chunk);
                let yb = Array1::from_iter(chunk.iter().map(|&i| y[i] / scale));
                step += 1;
                total += f64::from(net.step(xb.view(), &yb, &mut adam, lr, cfg.weight_decay, step))
                    * chunk.len() as f64;
            }
            let loss = (total / x.nrows().max(1) as f64) as f32;
            losses.push(loss);
            on_epoch(epoch, &net, loss);
        }
        if let Some(l) = net.layers.last_mut() {
            l.w *= scale;
            l.b *= scale;
        }
        (net, losses)
    }

    /// One Adam step on a batch; returns the batch loss.
    fn step(
        &mut self,
        x: ArrayView2<f32>,
        y: &Array1<f32>,
        adam: &mut Adam,
        lr: f32,
        weight_decay: f32,
        t: u32,
    ) -> f32 {
        let n = x.nrows() as f32;
        // Forward, keeping pre-activations for the backward pass.
        let mut acts = vec![x.to_owned()];
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let mut z = acts[i].dot(&l.w) + &l.b;
            if i < last {
                z.mapv_inplace(|v| v.max(0.0));
            }
            acts.push(z);
        }
        let out = acts[last + 1].column(0).to_owned();
        let err = &out - y;
        let loss = err.mapv(|e| e * e).sum() / n;
        let mut dz = (err * (2.0 / n)).insert_axis(Axis(1));
        for i in (0..self.layers.len()).rev() {
            let a_prev = &acts[i];
            let mut dw = a_prev.t().dot(&dz);
            let db = dz.sum_axis(Axis(0));
            let da = if i > 0 {
                Some(dz.dot(&self.layers[i].w.t()))
            } else {
                None
            };
            if weight_decay > 0.0 {
                dw.scaled_add(weight_decay, &self.layers[i].w);
            }
            adam.update(i, &mut self.layers[i], &dw, &db, lr, t);
            if let Some(mut da) = da {
                // ReLU derivative: the activation of the previous layer is positive where it passed.
                ndarray::Zip::from(&mut da).and(&acts[i]).for_each(|d, &a| {
                    if a <= 0.0 {
                        *d = 0.0;
                    }
                });
                dz = da;
            }
        }
        loss
    }
}

struct Adam {
    mw: Vec<Array2<f32>>,
    vw: Vec<Array2<f32>>,
    mb: Vec<Array1<f32>>,
    vb: Vec<Array1<f32>>,
}

impl Adam {
    fn new(net: &Mlp) -> Self {
        Self {
            mw: net
                .layers
                .iter()
                .map(|l| Array2::zeros(l.w.raw_dim()))
                .collect(),
            vw: net
                .layers
                .iter()
                .map(|l| Array2::zeros(l.w.raw_dim()))
                .collect(),
            mb: net
                .layers
                .iter()
                .map(|l| Array1::zeros(l.b.raw_dim()))
                .collect(),
            vb: net
                .layers
                .iter()
                .map(|l| Array1::zeros(l.b.raw_dim()))
                .collect(),
        }
    }

    fn update(
        &mut self,
        i: usize,
        l: &mut Dense,
        dw: &Array2<f32>,
        db: &Array1<f32>,
        lr: f32,
        t: u32,
    ) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        let c1 = 1.0 - B1.powi(t as i32);
        let c2 = 1.0 - B2.powi(t as i32);
        ndarray::Zip::from(&mut l.w)
            .and(&mut self.mw[i])
            .and(&mut self.vw[i])
            .and(dw)
            .for_each(|w, m, v, &g| {
                *m = B1 * *m + (1.0 - B1) * g;
                *v = B2 * *v + (1.0 - B2) * g * g;
                *w -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
            });
        ndarray::Zip::from(&mut l.b)
            .and(&mut self.mb[i])
            .and(&mut self.vb[i])
            .and(db)
            .for_each(|b, m, v, &g| {
                *m = B1 * *m + (1.0 - B1) * g;
                *v = B2 * *v + (1.0 - B2) * g * g;
                *b -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_simple_nonlinear_function() {
        // y = |x0| * 10 + x1: needs the hidden ReLUs.
        let mut rng = StdRng::seed_from_u64(1);
        let x = Array2::from_shape_fn((512, 2), |_| rng.random::<f32>() * 2.0 - 1.0);
        let y: Vec<f32> = x
            .rows()
            .into_iter()
            .map(|r| r[0].abs() * 10.0 + r[1])
            .collect();
        let cfg = TrainConfig {
            hidden: vec![16, 8],
            epochs: 200,
            batch_size: 32,
            learning_rate: 0.01,
            weight_decay: 0.0,
            seed: 7,
            target_scale: 10.0,
        };
        let (net, losses) = Mlp::train(x.view(), &y, &cfg);
        assert!(losses.last().unwrap() < &(losses[0] / 20.0), "{losses:?}");
        let pred = net.forward(x.view());
        let mse: f32 = pred
            .column(0)
            .iter()
            .zip(&y)
            .map(|(p, t)| (p - t).powi(2))
            .sum::<f32>()
            / 512.0;
        assert!(mse < 0.2, "mse {mse}");
        // Same seed, same network.
        let (again, _) = Mlp::train(x.view(), &y, &cfg);
        assert_eq!(again.layers[0].w, net.layers[0].w);
    }

    #[test]
    fn normaliser_centres_and_scales_and_survives_constant_columns() {
        let x = ndarray::arr2(&[[1.0f32, 5.0], [3.0, 5.0]]);
        let n = Normalizer::fit(x.view());
        assert_eq!(n.mean.to_vec(), vec![2.0, 5.0]);
        assert_eq!(n.std.to_vec(), vec![1.0, 1.0]);
        assert_eq!(n.apply(x.view()), ndarray::arr2(&[[-1.0, 0.0], [1.0, 0.0]]));
    }
}
