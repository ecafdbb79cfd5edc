"""Gradient codes for one parent: which child gets which parts, and how to decode.

A parent with ``k`` children and tolerance ``s`` uses a ``k x k`` matrix ``B``: child ``i`` returns
``sum_j B[i, j] * g(P_j)``. For any set ``F`` of arrived children the parent needs ``a`` with
``a^T B[F] = 1^T``; then ``sum_i a_i y_i = sum_j g(P_j)``.

Codes are block diagonal (so decoding and validation stay per block and cheap):

* fractional repetition (FRC) blocks of ``s + 1`` children with identical data and 0/1
  coefficients -- decoding picks one child per block, the result is an ordinary sum;
* when ``s + 1`` does not divide ``k``, one remainder block of size ``m`` (``s+1 < m < 2(s+1)``)
  that is itself ``s``-tolerant: a known small integer code, or the null-space construction of
  Tandon et al. restricted to cyclic supports, searched over a seeded family for the smallest
  worst-case decoding norm.

Tandon et al.'s random cyclic-repetition code over the *whole* fan-out is never used: its decoding
vectors blow up (norm 1e3..1e6) and float32 gradients would lose all precision.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

#: Residual a decoding vector must reach (float64) for a survivor set to count as decodable.
RESIDUAL_TOL = 1e-12
#: Largest decoding-vector norm accepted for float32 messages (decode error ~3.6e-8 * ||a||).
MAX_DECODE_NORM = 4.0

# Small integer codes (DESIGN §2): exact, well conditioned, easy to audit.
_INTEGER_CODES: dict[tuple[int, int], np.ndarray] = {
    (3, 1): np.array([[2, 1, 0], [0, 1, 2], [-1, 0, 1]], dtype=np.float64),
    (4, 2): np.array([[1, -1, -2, 0], [0, 2, 3, 1], [2, 0, -1, 1], [3, 1, 0, 2]], dtype=np.float64),
}


@dataclass(frozen=True, eq=False)  # identity hash: codes are cached, matrices are arrays
class Block:
    """One diagonal block of a parent's code: child slots ``slots`` and its ``len(slots)``-square matrix."""

    slots: tuple[int, ...]
    matrix: np.ndarray  # float64, shape (m, m)
    kind: str  # "frc" or "remainder"

    @cached_property  # read on every arrival at a parent: look it up once
    def table(self) -> dict[int, np.ndarray]:
        """Decoding vector (float64) for every decodable bitmask of this block's slots."""
        return decoding_table(self.kind, self.matrix.tobytes(), len(self.slots))


@dataclass(frozen=True, eq=False)
class Code:
    """A parent's gradient code: ``k`` children, tolerance ``s``, block-diagonal matrix."""

    k: int
    s: int
    blocks: tuple[Block, ...]

    @property
    def name(self) -> str:
        kinds = sorted({b.kind for b in self.blocks})
        return "+".join(kinds) if self.s else "uncoded"

    @property
    def matrix(self) -> np.ndarray:
        out = np.zeros((self.k, self.k))
        for b in self.blocks:
            out[np.ix_(b.slots, b.slots)] = b.matrix
        return out

    def support(self, slot: int) -> list[tuple[int, float]]:
        """``(part, coefficient)`` pairs child ``slot`` must combine (its row's nonzeros)."""
        return list(self._supports[slot])

    @cached_property
    def _supports(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """Every row's nonzeros, from the blocks (no k x k matrix: parents may have thousands of children)."""
        rows: list[tuple[tuple[int, float], ...]] = [()] * self.k
        for b in self.blocks:
            for i, slot in enumerate(b.slots):
                rows[slot] = tuple((b.slots[j], float(b.matrix[i, j])) for j in np.flatnonzero(b.matrix[i]))
        return tuple(rows)

    def decode(self, arrived: frozenset[int]) -> dict[int, float] | None:
        """Coefficients per arrived slot, or ``None`` when ``arrived`` does not determine the sum."""
        out: dict[int, float] = {}
        for b in self.blocks:
            mask = sum(1 << i for i, slot in enumerate(b.slots) if slot in arrived)
            a = b.table.get(mask)
            if a is None:
                return None
            for i, slot in enumerate(b.slots):
                if a[i] != 0.0:
                    out[slot] = float(a[i])
        return out

    def worst_norm(self) -> float:
        """Largest ``||a||_2`` over all survivor sets of size ``k - s`` (blocks combine as a sum of squares)."""
        return float(np.sqrt(sum(_block_worst_sq(b, self.s) for b in self.blocks)))


def _block_worst_sq(block: Block, s: int) -> float:
    m = len(block.slots)
    worst = 0.0
    for dead in itertools.combinations(range(m), min(s, m - 1)):
        mask = sum(1 << i for i in range(m) if i not in dead)
        a = block.table.get(mask)
        if a is None:
            raise ValueError(f"internal: block {block.kind} of size {m} cannot tolerate {s} stragglers")
        worst = max(worst, float(a @ a))
    return worst


def make_code(k: int, s: int, code: str = "auto", seed: int = 0) -> Code:
    """Build the code for a parent with ``k`` children tolerating ``s`` (``s < k``) stragglers."""
    if s == 0:
        return Code(k, 0, tuple(Block((i,), np.ones((1, 1)), "frc") for i in range(k)))
    g = s + 1
    q, r = divmod(k, g)
    if code == "frc" and r:
        raise ValueError(
            f"code='frc' needs stragglers+1 to divide every fan-out, but a parent has {k} children "
            f"and stragglers={s}; use code='auto' (block codes) or a branching divisible by {g}"
        )
    n_frc = q if r == 0 else q - 1
    blocks = [Block(tuple(range(i * g, (i + 1) * g)), np.ones((g, g)), "frc") for i in range(n_frc)]
    if r:
        m = g + r
        start = n_frc * g
        blocks.append(Block(tuple(range(start, start + m)), remainder_matrix(m, s, seed), "remainder"))
    return Code(k, s, tuple(blocks))


def cyclic_support(m: int, s: int) -> np.ndarray:
    """0/1 ``m x m`` mask: row ``i`` covers parts ``i .. i+s`` (mod ``m``)."""
    mask = np.zeros((m, m), dtype=bool)
    for i in range(m):
        mask[i, [(i + t) % m for t in range(s + 1)]] = True
    return mask


def _fourier_checks(m: int) -> list[np.ndarray]:
    """Real parity checks orthogonal to the all-ones vector: cos/sin rows of the DFT, frequency >= 1."""
    t = np.arange(m)
    rows = []
    for j in range(1, m // 2 + 1):
        rows.append(np.cos(2 * np.pi * j * t / m))
        if 2 * j != m:
            rows.append(np.sin(2 * np.pi * j * t / m))
    return rows


def _null_space_code(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows restricted to their support and lying in ``null(h)``, each scaled to max |entry| 1."""
    m = mask.shape[0]
    b = np.zeros((m, m))
    for i in range(m):
        cols = np.flatnonzero(mask[i])
        row = np.linalg.svd(h[:, cols])[2][-1]
        row = row / row[np.argmax(np.abs(row))]
        b[i, cols] = np.where(np.abs(row) < 1e-13, 0.0, row)
    return b


@lru_cache(maxsize=None)
def remainder_matrix(m: int, s: int, seed: int = 0, trials: int = 16) -> np.ndarray:
    """An ``s``-tolerant ``m x m`` code with cyclic supports and the smallest worst decoding norm found.

    Candidates: the known integer code (if any); null-space codes (Tandon et al., Alg. 2) whose
    parity checks are ``s`` real DFT rows -- with the ``s`` lowest symmetric frequencies around
    ``m/2`` this is the real cyclic BCH-type code -- and ``trials`` seeded random checks. Rows of a
    null-space code lie in ``null(H)`` with ``H 1 = 0``, so any ``m - s`` independent rows span a
    space containing the all-ones vector. Seeded, hence identical on every rank.
    """
    mask = cyclic_support(m, s)
    candidates = [_INTEGER_CODES[(m, s)]] if (m, s) in _INTEGER_CODES else []
    fourier = _fourier_checks(m)
    for rows in itertools.islice(itertools.combinations(range(len(fourier)), s), 64):
        candidates.append(_null_space_code(np.array([fourier[r] for r in rows]), mask))
    rng = np.random.default_rng([seed, m, s])
    for _ in range(trials):
        h = rng.standard_normal((s, m))
        candidates.append(_null_space_code(h - h.mean(axis=1, keepdims=True), mask))
    best, best_norm = None, np.inf
    for b in candidates:
        try:
            norm = _block_worst_sq(Block(tuple(range(m)), b, "remainder"), s)
        except ValueError:
            continue
        if norm < best_norm - 1e-12:
            best, best_norm = b, norm
    if best is None:
        raise ValueError(f"no {s}-tolerant code of size {m} found")
    return best


@lru_cache(maxsize=256)
def decoding_table(kind: str, matrix_bytes: bytes, m: int) -> dict[int, np.ndarray]:
    """Map every decodable arrival bitmask to its (minimum-norm) float64 decoding vector."""
    b = np.frombuffer(matrix_bytes, dtype=np.float64).reshape(m, m)
    table: dict[int, np.ndarray] = {}
    if kind == "frc":  # one group: any single arrival decodes, coefficient 1 on the lowest slot
        for mask in range(1, 1 << m):
            a = np.zeros(m)
            a[(mask & -mask).bit_length() - 1] = 1.0
            table[mask] = a
        return table
    ones = np.ones(m)
    for mask in range(1, 1 << m):
        rows = [i for i in range(m) if mask >> i & 1]
        sub = b[rows]
        coef, *_ = np.linalg.lstsq(sub.T, ones, rcond=None)
        if np.max(np.abs(coef @ sub - ones)) <= RESIDUAL_TOL * max(1.0, np.abs(coef).max()):
            a = np.zeros(m)
            a[rows] = coef
            table[mask] = a
    return table
