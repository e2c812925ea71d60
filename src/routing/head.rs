//! A linear head over the prompt embedding: softmax regression trained on a router's own
//! utterances. It picks the route (where routes lie close together, learned weights
//! separate them better than the nearest centroid or utterance); the blended cosine
//! score of the route it picks still decides "out of scope", since a softmax is
//! confident far from every route too. `fit` uses it only where it measures better.
//!
//! Training starts from the centroid classifier (each route's weights its centroid,
//! scaled) so it begins where cosine routing is, and runs a fixed, seeded schedule:
//! the same utterances give the same head.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::scorer::RouteVectors;

/// Logit scale of the starting weights (cosine × SCALE).
const SCALE: f32 = 16.0;
const EPOCHS: usize = 30;
const LEARNING_RATE: f32 = 0.5;
const WEIGHT_DECAY: f32 = 1e-4;

#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    dims: usize,
    /// Route-major: route r's weights are `weights[r * dims..(r + 1) * dims]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b)
}

impl Head {
    /// Trains on every route's utterances; `None` for fewer than two routes (nothing to
    /// choose between) or no utterances.
    pub fn train(routes: &[RouteVectors]) -> Option<Self> {
        let n = routes.len();
        let dims = routes.iter().find_map(|r| r.utterances.first())?.len();
        if n < 2 || dims == 0 {
            return None;
        }
        let mut head = Head {
            dims,
            weights: routes
                .iter()
                .flat_map(|r| r.centroid.iter().map(|c| c * SCALE))
                .collect(),
            bias: vec![0.0; n],
        };
        let mut samples: Vec<(usize, &[f32])> = routes
            .iter()
            .enumerate()
            .flat_map(|(r, route)| route.utterances.iter().map(move |u| (r, u.as_slice())))
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e3c_ac4e);
        let mut probs = vec![0f32; n];
        let steps = (EPOCHS * samples.len()).max(1) as f32;
        let mut step = 0usize;
        for _ in 0..EPOCHS {
            samples.shuffle(&mut rng);
            for &(truth, x) in &samples {
                let lr = LEARNING_RATE * (1.0 - step as f32 / steps);
                step += 1;
                head.softmax(x, &mut probs);
                for (r, &p) in probs.iter().enumerate() {
                    let g = p - f32::from(u8::from(r == truth));
                    // Most routes' probabilities are ~0 for a given utterance: skip them.
                    if g.abs() < 1e-4 {
                        continue;
                    }
                    let row = &mut head.weights[r * dims..(r + 1) * dims];
                    for (w, xi) in row.iter_mut().zip(x) {
                        *w -= lr * (g * xi + WEIGHT_DECAY * *w);
                    }
                    head.bias[r] -= lr * g;
                }
            }
        }
        Some(head)
    }

    fn softmax(&self, x: &[f32], out: &mut [f32]) {
        let mut max = f32::NEG_INFINITY;
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.logit(r, x);
            max = max.max(*o);
        }
        let mut sum = 0.0;
        for o in out.iter_mut() {
            *o = (*o - max).exp();
            sum += *o;
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }

    fn logit(&self, r: usize, x: &[f32]) -> f32 {
        dot(&self.weights[r * self.dims..(r + 1) * self.dims], x) + self.bias[r]
    }

    pub fn routes(&self) -> usize {
        self.bias.len()
    }

    /// The route the head picks for a unit prompt vector.
    pub fn best(&self, x: &[f32]) -> usize {
        (0..self.routes())
            .map(|r| (r, self.logit(r, x)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0, |(r, _)| r)
    }

    /// Little-endian: dims (u32), routes (u32), weights, bias.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * (self.weights.len() + self.bias.len()));
        out.extend_from_slice(&(self.dims as u32).to_le_bytes());
        out.extend_from_slice(&(self.routes() as u32).to_le_bytes());
        for x in self.weights.iter().chain(&self.bias) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// `None` when the bytes are not a head (then it is trained again).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |at: usize| -> Option<[u8; 4]> { bytes.get(at..at + 4)?.try_into().ok() };
        let dims = u32::from_le_bytes(word(0)?) as usize;
        let routes = u32::from_le_bytes(word(4)?) as usize;
        let floats = routes.checked_mul(dims)?.checked_add(routes)?;
        if bytes.len() != 8 + 4 * floats {
            return None;
        }
        let values: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (weights, bias) = values.split_at(routes * dims);
        Some(Head {
            dims,
            weights: weights.to_vec(),
            bias: bias.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn the_head_separates_routes_a_centroid_confuses_and_round_trips() {
        // Route 0's utterances spread wide; route 1 sits close beside them.
        let routes = vec![
            RouteVectors::new(vec![
                unit(&[1.0, 0.0, 0.0]),
                unit(&[1.0, 0.9, 0.0]),
                unit(&[1.0, -0.9, 0.0]),
            ]),
            RouteVectors::new(vec![unit(&[1.0, 0.5, 0.3]), unit(&[1.0, 0.6, 0.35])]),
        ];
        let head = Head::train(&routes).expect("two routes");
        assert_eq!(head.best(&unit(&[1.0, 0.55, 0.33])), 1);
        assert_eq!(head.best(&unit(&[1.0, -0.8, 0.0])), 0);
        assert_eq!(Head::from_bytes(&head.to_bytes()), Some(head.clone()));
        assert_eq!(Head::from_bytes(&head.to_bytes()[1..]), None);
        assert_eq!(Head::train(&routes), Some(head), "seeded: the same head");
        assert!(Head::train(&routes[..1]).is_none());
    }
}
