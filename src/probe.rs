//! Linear probes: L2-regularised logistic regression (argmin's L-BFGS) on
//! standardised activations, returned as a unit direction in activation
//! space. Against the plain mean difference it weighs each dimension by how
//! noisy it is, so the wording a template adds to both classes counts for less.

use argmin::core::{CostFunction, Executor, Gradient};
use argmin::solver::linesearch::condition::ArmijoCondition;
use argmin::solver::linesearch::BacktrackingLineSearch;
use argmin::solver::quasinewton::LBFGS;
use ndarray::{s, Array1, Array2, ArrayView2, Axis};

/// Regularisation strength on the summed log-loss over standardised
/// features: strong, so the probe stays close to a scaled mean difference and
/// generalises to wrappers it never saw.
pub const ALPHA: f32 = 100.0;

/// Summed logistic loss of `x . w + b` against labels ±1, plus `alpha/2 |w|^2`
/// (the intercept `b`, the last parameter, is not penalised).
struct Logistic<'a> {
    x: ArrayView2<'a, f32>,
    y: Array1<f32>,
    alpha: f32,
}

impl Logistic<'_> {
    fn margins(&self, p: &Array1<f32>) -> Array1<f32> {
        let d = self.x.ncols();
        (self.x.dot(&p.slice(s![..d])) + p[d]) * &self.y
    }
}

impl CostFunction for Logistic<'_> {
    type Param = Array1<f32>;
    type Output = f32;

    fn cost(&self, p: &Array1<f32>) -> Result<f32, argmin::core::Error> {
        let w = p.slice(s![..self.x.ncols()]);
        // log(1 + e^-m), without overflow for large |m|.
        let loss: f32 = self.margins(p).iter().map(|&m| (-m).max(0.0) + (-m.abs()).exp().ln_1p()).sum();
        Ok(loss + 0.5 * self.alpha * w.dot(&w))
    }
}

impl Gradient for Logistic<'_> {
    type Param = Array1<f32>;
    type Gradient = Array1<f32>;

    fn gradient(&self, p: &Array1<f32>) -> Result<Array1<f32>, argmin::core::Error> {
        let d = self.x.ncols();
        let r = self.margins(p).mapv(|m| -1.0 / (1.0 + m.exp())) * &self.y;
        // A 1 x n by n x d product: a matrix multiply, far faster than a strided x^T . r.
        let gw = r.view().insert_axis(Axis(0)).dot(&self.x).remove_axis(Axis(0)) + &(&p.slice(s![..d]) * self.alpha);
        let mut g = Array1::zeros(d + 1);
        g.slice_mut(s![..d]).assign(&gw);
        g[d] = r.sum();
        Ok(g)
    }
}

/// The probe's unit direction, oriented so harmful rows project higher than
/// harmless ones; None when a class is missing or the fit fails. `x` is
/// standardised in place: it is often the largest array an extraction holds.
pub fn logistic_direction(mut x: Array2<f32>, harmful: &[bool]) -> Option<Array1<f32>> {
    if x.nrows() != harmful.len() || !harmful.iter().any(|&h| h) || harmful.iter().all(|&h| h) {
        return None;
    }
    // A non-finite value would make the line search backtrack forever.
    if !x.iter().all(|v| v.is_finite()) {
        return None;
    }
    let mean = x.mean_axis(Axis(0))?;
    let sd = x.std_axis(Axis(0), 0.0).mapv(|s| s + 1e-3);
    x -= &mean;
    x /= &sd;
    let d = x.ncols();
    let y: Array1<f32> = harmful.iter().map(|&h| if h { 1.0 } else { -1.0 }).collect();
    let problem = Logistic { x: x.view(), y, alpha: ALPHA };
    // Converged as scikit-learn's lbfgs would call it (its loss is ours times 1/ALPHA).
    // A backtracking line search takes one or two evaluations a step where More-Thuente takes many.
    let linesearch = BacktrackingLineSearch::new(ArmijoCondition::new(1e-4f32).ok()?);
    let solver = LBFGS::new(linesearch, 10).with_tolerance_grad(0.3).ok()?;
    let init = Array1::zeros(d + 1);
    let result = Executor::new(problem, solver).configure(|state| state.param(init).max_iters(100)).run().ok()?;
    let best = result.state().best_param.clone()?;
    let mut direction = best.slice(s![..d]).to_owned() / &sd;
    let norm = direction.dot(&direction).sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return None;
    }
    direction /= norm;
    Some(direction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn the_probe_finds_the_separating_dimension_and_ignores_a_loud_shared_one() {
        // Dimension 0 carries the class (small spread); dimension 1 is large
        // noise shared by both classes, which a mean difference would also pick up.
        let n = 200;
        let harmful: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let x = Array2::from_shape_fn((n, 2), |(i, j)| {
            let noise = ((i * 37 + j * 11) % 17) as f32 - 8.0;
            let class = if harmful[i] { 1.0 } else { -1.0 };
            if j == 0 { class + 0.05 * noise } else { 10.0 * noise + 1.0 + class }
        });
        let d = logistic_direction(x.clone(), &harmful).unwrap();
        assert!(d[0] > 0.9, "{d:?}");
        assert!(logistic_direction(x.clone(), &vec![true; n]).is_none());
        let mut overflowed = x;
        overflowed[[3, 1]] = f32::INFINITY;
        assert!(logistic_direction(overflowed, &harmful).is_none(), "an infinite activation is no fit, not an endless line search");
    }
}
