"""Synthetic text for the demo, generated here (no downloads): sequences from a few fixed sparse
Markov chains ("topics"). Each sequence follows one topic, so a model that only learns bigrams
stalls at the mixture's entropy; one that reads the context (attention) and keeps topic-specific
transitions apart (the experts) goes down towards the chains' own entropy rate."""

from __future__ import annotations

import numpy as np


class TopicMarkovText:
    """num_topics Markov chains over `vocab` tokens; each token has `branching` successors per
    topic, with Dirichlet-drawn probabilities. Deterministic given `seed`."""

    def __init__(self, vocab: int = 64, num_topics: int = 4, branching: int = 3, seed: int = 0):
        if vocab < 2 or num_topics < 1 or not 1 <= branching <= vocab:
            raise ValueError(f"TopicMarkovText: need vocab >= 2, num_topics >= 1 and "
                             f"1 <= branching <= vocab, got {vocab}, {num_topics}, {branching}")
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.transitions = np.zeros((num_topics, vocab, vocab))  # [topic, from, to]
        for topic in range(num_topics):
            for token in range(vocab):
                successors = rng.choice(vocab, size=branching, replace=False)
                self.transitions[topic, token, successors] = rng.dirichlet(np.ones(branching))
        self._cumulative = np.cumsum(self.transitions, axis=-1)

    def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """[batch, length] int32 token ids: a random topic and first token per sequence."""
        topics = rng.integers(len(self.transitions), size=batch)
        out = np.empty((batch, length), np.int32)
        out[:, 0] = rng.integers(self.vocab, size=batch)
        for i in range(1, length):
            cdf = self._cumulative[topics, out[:, i - 1]]  # [batch, vocab]
            u = rng.random((batch, 1)) * cdf[:, -1:]
            out[:, i] = np.minimum(np.sum(cdf < u, axis=-1), self.vocab - 1)
        return out

    def entropy_floor(self, length: int) -> float:
        """Mean nats per predicted token (positions 1..length-1) of a model that knows each
        sequence's topic and chain exactly: the loss no model can beat on this data."""
        p = self.transitions
        safe = np.where(p > 0, p, 1.0)
        row_entropy = -np.sum(p * np.log(safe), axis=-1)  # [topic, token]
        state = np.full((len(p), self.vocab), 1.0 / self.vocab)  # distribution of the token
        total = 0.0
        for _ in range(1, length):
            total += float(np.mean(np.sum(state * row_entropy, axis=-1)))
            state = np.einsum("tv,tvw->tw", state, p)
        return total / (length - 1)
