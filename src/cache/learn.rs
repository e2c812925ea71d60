//! `maxErrorRate` on the lookup path: the bounded decision for a cache's nearest
//! candidate, and the labels that teach it — an exploration's prompt answered by the
//! insert that follows it (the REST flow, and the gateway's store after a miss), and
//! `/feedback`. The maths is in [`super::bound`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::bound::{self, Budget, Decision, Estimate, Features, Fit, Observation};
use super::table::SlotTable;
use super::verify::{self, Rejection, Signature, VerifyRules};
use super::{
    chat, normalize_prompt, prompt_hash, CacheService, CacheState, Considered, Generation, Query,
    SearchOutcome, Strategy,
};
use crate::embed::Embedder;
use crate::index::dot;
use crate::metrics::metrics;
use crate::store::{EntryId, EntryRecord, FeedbackRecord, Store};

/// With `maxErrorRate` on, candidates below this similarity are not considered (unless
/// the request names its own threshold).
pub(super) const BOUNDED_FLOOR: f32 = 0.5;
/// Explorations waiting for their prompt's answer, service-wide, and for how long.
const MAX_PENDING: usize = 10_000;
const PENDING_TTL: Duration = Duration::from_secs(600);

/// One cache's model of P(correct) and its error budget.
#[derive(Default)]
pub(super) struct Learner {
    fit: RwLock<Arc<Fit>>,
    budget: Mutex<Budget>,
    since_fit: AtomicUsize,
    /// Observations are read-modify-writes of an entry's record: one at a time.
    writes: tokio::sync::Mutex<()>,
}

impl Learner {
    /// Held while an entry's feedback record is read, changed and written back.
    pub(super) async fn write_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writes.lock().await
    }

    fn fit(&self) -> Arc<Fit> {
        self.fit.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refits the cache-wide curve to every observation in the table (at start-up).
    pub(super) fn refit(&self, table: &SlotTable) {
        self.set_fit(Fit::new(
            table.feedback_records().flat_map(|r| r.observations.iter()),
        ));
    }

    fn set_fit(&self, fit: Fit) {
        *self.fit.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fit);
        self.since_fit.store(0, Ordering::Relaxed);
    }
}

type PendingKey = (String, String, BTreeMap<String, String>);

struct Pending {
    entry: EntryId,
    x: Features,
    at: Instant,
}

/// Lookups that went to the model with a candidate in view, by (cache, prompt, scope):
/// the answer stored next for that prompt labels the candidate.
#[derive(Default)]
pub(super) struct Explorations {
    waiting: HashMap<PendingKey, Pending>,
    order: VecDeque<(PendingKey, Instant)>,
}

impl Explorations {
    fn remember(&mut self, key: PendingKey, pending: Pending) {
        while self.order.len() >= MAX_PENDING {
            self.drop_oldest();
        }
        self.order.push_back((key.clone(), pending.at));
        self.waiting.insert(key, pending);
    }

    fn take(&mut self, key: &PendingKey) -> Option<Pending> {
        let now = Instant::now();
        while self
            .order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) >= PENDING_TTL)
        {
            self.drop_oldest();
        }
        self.waiting.remove(key)
    }

    /// Forgets the oldest exploration, unless its prompt was explored again since.
    fn drop_oldest(&mut self) {
        if let Some((old, at)) = self.order.pop_front() {
            if self.waiting.get(&old).is_some_and(|p| p.at == at) {
                self.waiting.remove(&old);
            }
        }
    }
}

fn pending_key(cache_id: &str, prompt: &str, attributes: &BTreeMap<String, String>) -> PendingKey {
    (
        cache_id.to_string(),
        prompt_hash(prompt),
        attributes.clone(),
    )
}

/// Whether a fresh answer says the same as the cached one: equal once normalised, or
/// embeddings at least `level` apart in cosine with the lexical rules agreeing (a
/// different number or name in an answer is a different answer).
pub async fn answers_agree(
    embedder: &Embedder,
    cached: &str,
    fresh: &str,
    level: f32,
) -> Option<bool> {
    let (cached, fresh) = (chat::answer_text(cached), chat::answer_text(fresh));
    if normalize_prompt(&cached) == normalize_prompt(&fresh) {
        return Some(true);
    }
    let vectors = embedder
        .embed_many(vec![cached.to_string(), fresh.to_string()])
        .await
        .ok()?;
    let [a, b] = vectors.as_slice() else {
        return None;
    };
    Some(answers_agree_at(
        &cached,
        &fresh,
        dot(&a.vector, &b.vector),
        level,
    ))
}

/// The rule of [`answers_agree`] for two answers whose embeddings' cosine is known.
pub fn answers_agree_at(cached: &str, fresh: &str, cosine: f32, level: f32) -> bool {
    normalize_prompt(cached) == normalize_prompt(fresh)
        || (cosine >= level
            && verify::check(
                &VerifyRules::default(),
                &Signature::of(cached),
                &Signature::of(fresh),
            )
            .is_ok())
}

/// Appends an observation to an entry's record, dropping the oldest past the cap.
pub(super) fn push(record: &mut FeedbackRecord, observation: Observation) {
    record.observations.push(observation);
    if record.observations.len() > bound::MAX_PER_ENTRY {
        record.observations.remove(0);
    }
}

/// Adds a labelled observation to an entry's record; durable on return.
async fn record(
    store: &Store,
    state: &CacheState,
    cache_id: &str,
    id: &EntryId,
    observation: Observation,
) -> Result<(), crate::store::StoreError> {
    let _one = state.learner.writes.lock().await;
    let generation = state.generation();
    if generation.read().slot_of(id).is_none() {
        return Ok(()); // evicted meanwhile
    }
    let mut record: FeedbackRecord = generation
        .read()
        .feedback_of(id)
        .map(|f| (*f).clone())
        .unwrap_or_default();
    push(&mut record, observation);
    store.put_feedback(cache_id, id, &record)?;
    store.flush().await?;
    generation.write().set_feedback(id, Arc::new(record));
    refit_if_due(state, &generation).await;
    Ok(())
}

/// Counts a new label; once the labels since the last fit are a twentieth of those it
/// used, refits the cache-wide curve.
pub(super) async fn refit_if_due(state: &CacheState, generation: &Generation) {
    let labels = state.learner.since_fit.fetch_add(1, Ordering::Relaxed) + 1;
    if labels < (state.learner.fit().observations() / 20).max(16) {
        return;
    }
    // Copied out under the table's lock, fitted off the runtime's threads (38 ms for
    // 100,000 labels, benches/bound.rs): inserts never wait for a fit.
    let observations: Vec<Observation> = generation
        .read()
        .feedback_records()
        .flat_map(|r| r.observations.iter().cloned())
        .collect();
    if let Ok(fit) = tokio::task::spawn_blocking(move || Fit::new(observations.iter())).await {
        state.learner.set_fit(fit);
    }
}

impl CacheService {
    /// The bounded decision on a cache's nearest candidate that passed the rules: serve
    /// it, or not (then remember the exploration, so the answer that follows labels it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decide_bounded(
        &self,
        cache_id: &str,
        state: &CacheState,
        generation: &Generation,
        query: &Query,
        query_sig: &Signature,
        entry: EntryRecord,
        similarity: f32,
        runner_up: Option<f32>,
        max_error_rate: f32,
        outcome: &mut SearchOutcome,
    ) -> bool {
        let x = bound::features(
            similarity,
            runner_up,
            query_sig.overlap(&Signature::of(&entry.prompt)),
        );
        let own = generation.read().feedback_of(&entry.id);
        let own = own.as_ref().map_or(&[][..], |r| &r.observations[..]);
        let estimate = state.learner.fit().estimate(&x, own);
        let decision = {
            let mut budget = state
                .learner
                .budget
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            bound::decide(
                &estimate,
                max_error_rate,
                &mut budget,
                &mut rand::thread_rng(),
            )
        };
        let m = metrics();
        m.bounded_decisions
            .with_label_values(&[&m.cache_label(cache_id), decision.name()])
            .inc();
        if decision.labels() {
            let pending = Pending {
                entry: entry.id,
                x,
                at: Instant::now(),
            };
            self.explorations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remember(
                    pending_key(cache_id, &query.prompt, &query.attributes),
                    pending,
                );
            outcome.explore = Some(entry.id);
        }
        let served = decision == Decision::Serve;
        if served {
            self.serve(outcome, query, entry, similarity, Strategy::Semantic);
        } else if query.explain {
            let rejected = Rejection::NotConfident {
                lower_bound: estimate.lower_bound,
                required: 1.0 - max_error_rate,
            };
            outcome
                .considered
                .push(Considered::rejected(entry, similarity, rejected));
        }
        if query.explain {
            if let Some(considered) = outcome.considered.last_mut() {
                considered.estimate = Some(Explained { estimate, decision });
            }
        }
        served
    }

    /// After an insert: if the prompt was an exploration, compare its answer with the
    /// candidate's, off the request path, and record the label.
    pub(super) fn label_exploration(
        &self,
        cache_id: &str,
        state: &Arc<CacheState>,
        prompt: &str,
        attributes: &BTreeMap<String, String>,
        response: &str,
    ) {
        let Some(pending) = self
            .explorations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&pending_key(cache_id, prompt, attributes))
        else {
            return;
        };
        let (store, embedder, state) = (self.store.clone(), self.embedder.clone(), state.clone());
        let (cache_id, fresh) = (cache_id.to_string(), response.to_string());
        let level = self.config.answer_similarity;
        tokio::spawn(async move {
            let cached = match store.get(&cache_id, &pending.entry) {
                Ok(Some(entry)) => entry.response,
                _ => return, // gone meanwhile
            };
            let Some(correct) = answers_agree(&embedder, &cached, &fresh, level).await else {
                return;
            };
            let m = metrics();
            let label: &str = if correct { "same" } else { "different" };
            m.exploration_labels
                .with_label_values(&[m.cache_label(&cache_id).as_str(), label])
                .inc();
            let observation = Observation::new(pending.x, correct);
            if let Err(e) = record(&store, &state, &cache_id, &pending.entry, observation).await {
                tracing::warn!(error = %e, cache = %cache_id, "exploration label not stored");
            }
        });
    }

    /// A `/feedback` report as an observation: the prompt's features against the entry.
    pub(super) fn feedback_observation(
        &self,
        cache_id: &str,
        generation: &Generation,
        id: &EntryId,
        prompt: &str,
        vector: &[f32],
        correct: bool,
    ) -> Result<Observation, super::CacheError> {
        let (Some(entry), Some(own)) = (
            self.store.get(cache_id, id)?,
            self.store.get_vector(cache_id, id)?,
        ) else {
            return Err(super::CacheError::NotFound);
        };
        let near = self.nearest(
            cache_id,
            generation,
            vector,
            &entry.attributes,
            3,
            super::now_ms(),
        )?;
        let slot = generation.read().slot_of(id);
        let runner_up = near
            .iter()
            .find(|(s, _)| Some(*s) != slot)
            .map(|(_, sim)| *sim);
        let x = bound::features(
            dot(vector, &own),
            runner_up,
            Signature::of(prompt).overlap(&Signature::of(&entry.prompt)),
        );
        Ok(Observation::new(x, correct))
    }
}

/// What `?explain=true` shows of a bounded decision.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explained {
    #[serde(flatten)]
    pub estimate: Estimate,
    pub decision: Decision,
}
