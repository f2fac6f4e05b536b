// The CPU row loops of mlorc_ops.cpp, which includes this file once per instruction set it compiles
// them for (in namespaces v4, v3 and baseline, under `#pragma GCC target`): every function here, the
// inlined helpers included, is then compiled for that set. (With GCC's target_clones only the cloned
// function is: vector code in an inlined helper was compiled for the baseline, and its comparisons
// ran one lane at a time.) So no include guard, and no #include: the types come from mlorc_ops.cpp,
// Vec among them: one register of the instruction set (16 floats for AVX-512, 8 for AVX2, 4 for
// SSE), so that no build handles a vector wider than its registers (GCC's AVX2 code for 16-float
// vectors compared them one lane at a time).
constexpr int64_t kVecLanes = sizeof(Vec) / sizeof(float);

__attribute__((always_inline)) inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// [M1] columns [j, j + kVecLanes) of one row of (U * s) @ Vh, from the row's weights w
// (Factors::weights)
__attribute__((always_inline)) inline Vec lowrank_chunk(const Factors& f, const float* w, int64_t j) {
  Vec sum = {};
  for (int64_t k = 0; k < f.r; ++k) sum += w[k] * load_vec(f.vh + k * f.stride + j);
  return sum;
}

// [M1] row i of (U * s) @ Vh into out[0, stride), one vector at a time; w: r floats of scratch
inline void rebuild_row(const Factors& f, int64_t i, float* w, float* out) {
  f.weights(i, w);
  for (int64_t j = 0; j < f.stride; j += kVecLanes) {
    const Vec chunk = lowrank_chunk(f, w, j);
    std::memcpy(out + j, &chunk, sizeof chunk);
  }
}

// sums of |v| and counts over the negative entries of rows [begin, end), in kVecLanes lanes a row
// (the zero padding of the last chunk is not negative); w: r floats of scratch
void negative_rows(const Factors& v, int64_t begin, int64_t end, float* w, double* sum, double* count) {
  typedef double Doubles __attribute__((vector_size(2 * sizeof(Vec))));   // kVecLanes doubles
  const Vec zero = {}, one = zero + 1.f;
  Doubles total = {}, negatives = {};      // each lane's sums over the rows, in double
  for (int64_t i = begin; i < end; ++i) {
    v.weights(i, w);
    Vec row_sum = zero, row_count = zero;
    for (int64_t j = 0; j < v.stride; j += kVecLanes) {
      const Vec x = lowrank_chunk(v, w, j);
      row_sum -= x < zero ? x : zero;
      row_count += x < zero ? one : zero;
    }
    total += __builtin_convertvector(row_sum, Doubles);
    negatives += __builtin_convertvector(row_count, Doubles);
  }
  for (int l = 0; l < kVecLanes; ++l) {
    *sum += total[l];
    *count += negatives[l];
  }
}

// One row of MLorc_AdamW's pass: adamw_update at each entry, the new moments written to m and v, the
// second alone where m is null, neither where v is. A function of its own with restrict parameters
// (no two rows overlap), not inlined: inlined into adamw_rows, GCC left the loop that writes the
// moments unvectorized (restrict on local pointers did not reach it), and adamw_step_'s pass took
// 1.7-2.3x as long, 6.5-7.6x with full_weight_outside's kept part (one 8000 x 512 matrix, AVX-512,
// two threads; BENCHMARKS.md)
__attribute__((noinline)) void adamw_row(const AdamWArgs args, int64_t cols, float* __restrict p,
                                         const float* __restrict g, const float* __restrict m_row,
                                         const float* __restrict v_row, const float* __restrict k_row,
                                         float* __restrict m, float* __restrict v) {
  if (v == nullptr) {
    for (int64_t j = 0; j < cols; ++j) {
      float m_j, v_j;
      adamw_update(args, p[j], g[j], m_row[j], v_row[j], k_row[j], m_j, v_j);
    }
  } else if (m == nullptr) {
    for (int64_t j = 0; j < cols; ++j) {
      float m_j;
      adamw_update(args, p[j], g[j], m_row[j], v_row[j], k_row[j], m_j, v[j]);
    }
  } else {
    for (int64_t j = 0; j < cols; ++j) adamw_update(args, p[j], g[j], m_row[j], v_row[j], k_row[j], m[j], v[j]);
  }
}

// rows [begin, end); m_row, v_row and k_row hold one rebuilt row each (k_row: g's kept part, when
// kept has terms), w the weights of all three; m_out and v_out may be null
void adamw_rows(const AdamWArgs args, const Factors& m_old, const Factors& v_old, const Factors& kept,
                int64_t begin, int64_t end, int64_t cols, float* p, const float* g, float* m_out,
                float* v_out, float* m_row, float* v_row, float* k_row, float* w) {
  if (kept.r == 0) std::memset(k_row, 0, kept.stride * sizeof(float));
  for (int64_t i = begin; i < end; ++i) {
    rebuild_row(m_old, i, w, m_row);
    rebuild_row(v_old, i, w + m_old.r, v_row);
    if (kept.r > 0) rebuild_row(kept, i, w + m_old.r + v_old.r, k_row);
    adamw_row(args, cols, p + i * cols, g + i * cols, m_row, v_row, k_row,
              m_out == nullptr ? nullptr : m_out + i * cols, v_out == nullptr ? nullptr : v_out + i * cols);
  }
}

// One row of MLorc_Lion's pass: lion_update at each entry, the new momentum written to m unless it
// is null (a function of its own, as adamw_row)
__attribute__((noinline)) void lion_row(const LionArgs args, int64_t cols, float* __restrict p,
                                        const float* __restrict g, const float* __restrict m_row,
                                        const float* __restrict k_row, float* __restrict m) {
  if (m == nullptr) {
    for (int64_t j = 0; j < cols; ++j) {
      float m_j;
      lion_update(args, p[j], g[j], m_row[j], k_row[j], m_j);
    }
  } else {
    for (int64_t j = 0; j < cols; ++j) lion_update(args, p[j], g[j], m_row[j], k_row[j], m[j]);
  }
}

// rows [begin, end); m_row and k_row hold one rebuilt row each (k_row: g's kept part, when kept
// has terms), w the weights of both; m_out may be null
void lion_rows(const LionArgs args, const Factors& m_old, const Factors& kept, int64_t begin,
               int64_t end, int64_t cols, float* p, const float* g, float* m_out, float* m_row,
               float* k_row, float* w) {
  if (kept.r == 0) std::memset(k_row, 0, kept.stride * sizeof(float));
  for (int64_t i = begin; i < end; ++i) {
    rebuild_row(m_old, i, w, m_row);
    if (kept.r > 0) rebuild_row(kept, i, w + m_old.r, k_row);
    lion_row(args, cols, p + i * cols, g + i * cols, m_row, k_row, m_out == nullptr ? nullptr : m_out + i * cols);
  }
}

// ---------------------------------------------------------------------------------------------------
// moment_matmul's loops

// Whether the loops for a kind of moment split it (split() in mlorc_ops.cpp: a first moment)
template <bool kSquared, bool kRepair>
constexpr bool kSplit = !kSquared && !kRepair;

// columns [j, j + kVecLanes) of a row of g (cols floats): the row's last chunk is loaded partly, and
// chunks wholly in the padding past cols are zeros
__attribute__((always_inline)) inline Vec g_chunk(const float* gi, int64_t cols, int64_t j) {
  Vec g = {};
  if (j + kVecLanes <= cols)
    g = load_vec(gi + j);
  else if (j < cols)
    std::memcpy(&g, gi + j, (cols - j) * sizeof(float));
  return g;
}

// columns [j, j + kVecLanes) of row i of the new moment A, given that chunk of g: [M1] from the
// weights w, [M2] if repair, [M3]; the same expressions as lowrank_entry and moment_entry, so the
// entries equal what an update pass sees. Of a split first moment, only g's part: the chunk of g
template <bool kSquared, bool kRepair>
__attribute__((always_inline)) inline Vec new_chunk(const NewMoment& A, const float* w, Vec g, int64_t j) {
  if (kSplit<kSquared, kRepair>) return g;     // the loops add the factors' part
  Vec old = lowrank_chunk(A.old, w, j);
  const Vec zero = {};
  if (kRepair) old = old < zero ? zero + A.shift : old;
  return kSquared ? old * A.beta + g * g * (1.f - A.beta) : old * A.beta + g * (1.f - A.beta);
}

// new_chunk of the chunk of row gi of g
template <bool kSquared, bool kRepair>
__attribute__((always_inline)) inline Vec moment_chunk(const NewMoment& A, const float* w, const float* gi,
                                                            int64_t j) {
  return new_chunk<kSquared, kRepair>(A, w, g_chunk(gi, A.cols, j), j);
}

// [M3] for n entries of a split first moment's product, given g's part in out: out = (1 - beta) out +
// beta sum_k a[k step] b[k, :n], where a holds the factors' weights of the entries' row (U[i, :] s)
// and b (r rows of ld floats) their products with X (Vh X), or a (U s)^T X's column and b Vh
__attribute__((always_inline)) inline void add_factors_part(const NewMoment& A, float* __restrict out,
                                                            int64_t n, const float* a, int64_t step,
                                                            const float* __restrict b, int64_t ld) {
  for (int64_t e = 0; e < n; ++e) out[e] *= 1.f - A.beta;
  for (int64_t k = 0; k < A.old.r; ++k) {
    const float weight = A.beta * a[k * step];
    for (int64_t e = 0; e < n; ++e) out[e] += weight * b[k * ld + e];
  }
}

// The lane totals of 16 vectors: totals[q] is the sum of v[q]'s lanes. With 16-lane vectors, four
// rounds of adding pairs of vectors' halves ([a.lo | b.lo] + [a.hi | b.hi]) instead of 240 scalar
// adds; narrower vectors have fewer lanes to add one by one. The order of the sums is fixed. With
// the one-by-one adds for 16-lane vectors too, MLorc_AdamW r=4's whole step took 1.06x as long
// (products 1.17x; MLorc_Lion's step 0.97x, products 1.09x: bench/compare_builds.py, BENCHMARKS.md).
template <int kHalf, class V>
__attribute__((always_inline)) inline V add_halves(V a, V b) {
  // a and b each hold 8 / h groups of 2 h partial sums (one group per vector of lane_totals' input);
  // the result holds a's groups, then b's, each h wide: the first half of each group (MLORC_LO, an
  // index into the 32 lanes of a and b) plus its second half (MLORC_LO + h)
  constexpr int h = kHalf;
#define MLORC_LO(l) (((l) / h >= 8 / h ? 16 : 0) + (l) / h % (8 / h) * 2 * h + (l) % h)
  const V lo = __builtin_shufflevector(a, b, MLORC_LO(0), MLORC_LO(1), MLORC_LO(2), MLORC_LO(3),
      MLORC_LO(4), MLORC_LO(5), MLORC_LO(6), MLORC_LO(7), MLORC_LO(8), MLORC_LO(9), MLORC_LO(10),
      MLORC_LO(11), MLORC_LO(12), MLORC_LO(13), MLORC_LO(14), MLORC_LO(15));
  const V hi = __builtin_shufflevector(a, b, MLORC_LO(0) + h, MLORC_LO(1) + h, MLORC_LO(2) + h,
      MLORC_LO(3) + h, MLORC_LO(4) + h, MLORC_LO(5) + h, MLORC_LO(6) + h, MLORC_LO(7) + h,
      MLORC_LO(8) + h, MLORC_LO(9) + h, MLORC_LO(10) + h, MLORC_LO(11) + h, MLORC_LO(12) + h,
      MLORC_LO(13) + h, MLORC_LO(14) + h, MLORC_LO(15) + h);
#undef MLORC_LO
  return lo + hi;
}

template <class V>
__attribute__((always_inline)) inline void lane_totals(const V (&v)[16], float* totals) {
  if constexpr (sizeof(V) == 16 * sizeof(float)) {
    V by8[8], by4[4], by2[2];
    for (int k = 0; k < 8; ++k) by8[k] = add_halves<8>(v[2 * k], v[2 * k + 1]);
    for (int k = 0; k < 4; ++k) by4[k] = add_halves<4>(by8[2 * k], by8[2 * k + 1]);
    for (int k = 0; k < 2; ++k) by2[k] = add_halves<2>(by4[2 * k], by4[2 * k + 1]);
    const V total = add_halves<1>(by2[0], by2[1]);
    std::memcpy(totals, &total, sizeof total);
  } else {
    for (int q = 0; q < 16; ++q) {
      float total = 0.f;
      for (int l = 0; l < kVecLanes; ++l) total += v[q][l];
      totals[q] = total;
    }
  }
}

// rows [begin, end) of A @ X into out (rows, width), two rows at a time: each one-vector chunk of
// the two rows is multiplied into 2 x 8 running one-vector sums, whose lanes are added at the end
// (lane_totals). A chunk is rebuilt in registers as it is needed, or, where `buffered` (X wider than
// 8), the two rows are rebuilt once into `rows` (2 x stride floats) and read back for every 8
// columns, instead of rebuilt for each: r multiply-adds an entry, once. Xt is X^T (round_up8(width),
// stride), padded with zeros (loop_layout): the padding makes the partial last chunk contribute
// nothing beyond column cols. A lone last row is computed as a pair with itself. Of a split first
// moment the loops multiply g, and each result takes the factors' part from Vh X (add_factors_part;
// vhx: (r, round_up8(width))).
template <bool kSquared, bool kRepair, bool kBuffered>
__attribute__((always_inline)) inline void product_rows_impl(const NewMoment& A, const float* Xt,
                                                             const float* vhx, int64_t width,
                                                             int64_t begin, int64_t end, float* out,
                                                             float* w, float* rows) {
  const int64_t padded_width = round_up8(width);
  float *w0 = w, *w1 = w + A.old.r, *row0 = rows, *row1 = rows + A.old.stride;
  for (int64_t i = begin; i < end; i += 2) {
    const int64_t i1 = std::min(i + 1, end - 1);
    A.old.weights(i, w0);
    A.old.weights(i1, w1);
    const float *g0 = A.g + i * A.cols, *g1 = A.g + i1 * A.cols;
    // the next pair's rows are fetched while this pair's are used: the hardware prefetcher alone
    // left the loop waiting on memory whenever g was not in cache (a third to a half of its time).
    // Without the prefetches (here and in accumulate_rows_impl) the whole step of MLorc_AdamW r=4
    // took 1.08-1.10x as long, MLorc_Lion's 1.14x (bench/compare_builds.py, BENCHMARKS.md)
    const float* next0 = A.g + std::min(i + 2, end - 1) * A.cols;
    const float* next1 = A.g + std::min(i + 3, end - 1) * A.cols;
    if (kBuffered) {
      for (int64_t j = 0; j < A.old.stride; j += kVecLanes) {
        __builtin_prefetch(next0 + j);
        __builtin_prefetch(next1 + j);
        const Vec a0 = moment_chunk<kSquared, kRepair>(A, w0, g0, j),
                  a1 = moment_chunk<kSquared, kRepair>(A, w1, g1, j);
        std::memcpy(row0 + j, &a0, sizeof a0);
        std::memcpy(row1 + j, &a1, sizeof a1);
      }
    }
    for (int64_t q0 = 0; q0 < width; q0 += kWidthBlock) {
      Vec sum[2 * kWidthBlock] = {};       // row i's 8 sums, then row i1's
      for (int64_t j = 0; j < A.old.stride; j += kVecLanes) {
        Vec a0, a1;
        if (kBuffered) {
          a0 = load_vec(row0 + j);
          a1 = load_vec(row1 + j);
        } else {
          __builtin_prefetch(next0 + j);
          __builtin_prefetch(next1 + j);
          a0 = moment_chunk<kSquared, kRepair>(A, w0, g0, j);
          a1 = moment_chunk<kSquared, kRepair>(A, w1, g1, j);
        }
        for (int64_t q = 0; q < kWidthBlock; ++q) {
          const Vec x = load_vec(Xt + (q0 + q) * A.old.stride + j);
          sum[q] += a0 * x;
          sum[kWidthBlock + q] += a1 * x;
        }
      }
      float total[2 * kWidthBlock];
      lane_totals(sum, total);
      if (kSplit<kSquared, kRepair>) {
        add_factors_part(A, total, kWidthBlock, w0, 1, vhx + q0, padded_width);
        add_factors_part(A, total + kWidthBlock, kWidthBlock, w1, 1, vhx + q0, padded_width);
      }
      for (int64_t q = 0; q < kWidthBlock && q0 + q < width; ++q) {
        out[i * width + q0 + q] = total[q];
        if (i1 != i) out[i1 * width + q0 + q] = total[kWidthBlock + q];
      }
    }
  }
}

// rows [begin, end)'s share of A^T @ X, written to out (round_up8(width), stride), its transpose
// X^T A: for each one-vector chunk, 8 output rows stay in registers while the rows of A go by, each
// chunk of A added in times X[i, q]. Each chunk is rebuilt in registers as it is needed, or, where
// `buffered`, the chunks of a block of rows are rebuilt once into `chunk` and read back for every 8
// columns. Rows go in blocks of 32, so a block of g (and of U) stays in cache
// across its chunks; each row fetches its chunk in the next block ahead (the hardware prefetcher does
// not follow 32 rows at once). X is (rows, round_up8(width)), padded with zeros. Of a split first
// moment the loops multiply g, and add the rows' share of (U s)^T X into usx ((r, round_up8(width)),
// zeros on entry) for the factors' part (add_factors_part, once all rows are summed).
template <bool kSquared, bool kRepair, bool kBuffered>
__attribute__((always_inline)) inline void accumulate_rows_impl(const NewMoment& A, const float* X,
                                                                int64_t width, int64_t begin,
                                                                int64_t end, float* out, float* usx,
                                                                float* w) {
  const int64_t x_stride = round_up8(width);
  Vec chunk[kRowBlock];
  for (int64_t first = begin; first < end; first += kRowBlock) {
    const int64_t last = std::min(end, first + kRowBlock);
    for (int64_t i = first; i < last; ++i) {
      float* wi = w + (i - first) * A.old.r;
      A.old.weights(i, wi);
      if (kSplit<kSquared, kRepair>)        // (U s)^T X, row by row
        for (int64_t k = 0; k < A.old.r; ++k)
          for (int64_t q = 0; q < x_stride; ++q) usx[k * x_stride + q] += wi[k] * X[i * x_stride + q];
    }
    const auto new_chunk = [&](int64_t i, int64_t j) {
      __builtin_prefetch(A.g + std::min(i + kRowBlock, end - 1) * A.cols + j);    // see above
      return moment_chunk<kSquared, kRepair>(A, w + (i - first) * A.old.r, A.g + i * A.cols, j);
    };
    for (int64_t j = 0; j < A.old.stride; j += kVecLanes) {
      if (kBuffered)
        for (int64_t i = first; i < last; ++i) chunk[i - first] = new_chunk(i, j);
      for (int64_t q0 = 0; q0 < width; q0 += kWidthBlock) {
        Vec sum[kWidthBlock] = {};        // the range's first block writes out, the others add
        if (first != begin)
          for (int64_t q = 0; q < kWidthBlock; ++q) sum[q] = load_vec(out + (q0 + q) * A.old.stride + j);
        for (int64_t i = first; i < last; ++i) {
          const Vec a = kBuffered ? chunk[i - first] : new_chunk(i, j);
          const float* x = X + i * x_stride + q0;
          for (int64_t q = 0; q < kWidthBlock; ++q) sum[q] += a * x[q];
        }
        for (int64_t q = 0; q < kWidthBlock; ++q)
          std::memcpy(out + (q0 + q) * A.old.stride + j, &sum[q], sizeof(Vec));
      }
    }
  }
}

// One loop per kind of moment, each vectorizable without branches inside: calls
// loop(kSquared, kRepair) with the moment's kind as compile-time constants
template <class Loop>
__attribute__((always_inline)) inline void for_kind(const NewMoment& A, const Loop& loop) {
  using yes = std::true_type;
  using no = std::false_type;
  if (A.squared)
    A.repair ? loop(yes{}, yes{}) : loop(yes{}, no{});
  else
    A.repair ? loop(no{}, yes{}) : loop(no{}, no{});
}

// w: 2 r floats of scratch, rows: 2 stride floats (used where buffered)
void product_rows(const NewMoment& A, const float* Xt, const float* vhx, int64_t width, int64_t begin,
                  int64_t end, float* out, float* w, float* rows) {
  for_kind(A, [&](auto squared, auto repair) {
    if (buffered(A, width))
      product_rows_impl<squared.value, repair.value, true>(A, Xt, vhx, width, begin, end, out, w, rows);
    else
      product_rows_impl<squared.value, repair.value, false>(A, Xt, vhx, width, begin, end, out, w, rows);
  });
}

void accumulate_rows(const NewMoment& A, const float* X, int64_t width, int64_t begin, int64_t end,
                     float* out, float* usx, float* w) {
  for_kind(A, [&](auto squared, auto repair) {
    if (buffered(A, width))
      accumulate_rows_impl<squared.value, repair.value, true>(A, X, width, begin, end, out, usx, w);
    else
      accumulate_rows_impl<squared.value, repair.value, false>(A, X, width, begin, end, out, usx, w);
  });
}

// The split's A^T X, transposed, from g's part of it in total (round_up8(width), stride) and (U s)^T X
// in usx (r, round_up8(width)): each row c of total gets the factors' part Vh^T (U s)^T X[:, c]
void add_transposed_factors_part(const NewMoment& A, float* total, int64_t width, const float* usx) {
  for (int64_t c = 0; c < width; ++c)
    add_factors_part(A, total + c * A.old.stride, A.old.stride, usx + c, round_up8(width), A.old.vh,
                     A.old.stride);
}

// out (na, nb): out[k, q] = a[k, :] . b[q, :] for rows of `stride` floats (a multiple of kVecLanes),
// one vector of sums a pair: the small products (Vh X) of a split first moment
void row_dots(const float* a, int64_t na, const float* b, int64_t nb, int64_t stride, float* out) {
  for (int64_t k = 0; k < na; ++k)
    for (int64_t q = 0; q < nb; ++q) {
      Vec sum = {};
      for (int64_t j = 0; j < stride; j += kVecLanes)
        sum += load_vec(a + k * stride + j) * load_vec(b + q * stride + j);
      float total = 0.f;
      for (int l = 0; l < kVecLanes; ++l) total += sum[l];
      out[k * nb + q] = total;
    }
}

// ---------------------------------------------------------------------------------------------------
// moment_pair_matmul's loops: MLorc_AdamW's two new moments, M (a split first moment) and V (a
// second moment, repaired when kRepair), multiplied each by its own X in one pass over g. Columns go
// in blocks of kPairBlock (4) of each product, so 2 rows x (4 + 4) running sums are the 16 that
// lane_totals adds, and at rank 4 with the default sketch (4 columns) no sum is spent on padding.
// Where X is wider than one block, V's chunks are rebuilt once and read back for every block
// (buffered), as in product_rows_impl.

// The pair loops' kinds as compile-time constants: loop(repair, buffered), V repaired where it
// has a shift, buffered where X is wider than one block
template <class Loop>
__attribute__((always_inline)) inline void pair_kind(const NewMoment& V, int64_t width, const Loop& loop) {
  using yes = std::true_type;
  using no = std::false_type;
  const bool wide = width > kPairBlock;
  if (V.repair)
    wide ? loop(yes{}, yes{}) : loop(yes{}, no{});
  else
    wide ? loop(no{}, yes{}) : loop(no{}, no{});
}

// rows [begin, end) of M X_m and V X_v into out_m and out_v (rows, width), two rows at a time; Xt_m
// and Xt_v as product_rows_impl's Xt, vhx M's Vh X_m; w: 2 (r_m + r_v) floats, rows: 2 stride floats
template <bool kRepair, bool kBuffered>
__attribute__((always_inline)) inline void pair_product_rows_impl(
    const NewMoment& M, const NewMoment& V, const float* Xt_m, const float* Xt_v, const float* vhx,
    int64_t width, int64_t begin, int64_t end, float* out_m, float* out_v, float* w, float* rows) {
  const int64_t padded_width = round_up8(width), stride = M.old.stride;
  float *wm0 = w, *wm1 = w + M.old.r, *wv0 = w + 2 * M.old.r, *wv1 = wv0 + V.old.r;
  float *row0 = rows, *row1 = rows + stride;
  for (int64_t i = begin; i < end; i += 2) {
    const int64_t i1 = std::min(i + 1, end - 1);
    M.old.weights(i, wm0);
    M.old.weights(i1, wm1);
    V.old.weights(i, wv0);
    V.old.weights(i1, wv1);
    const float *g0 = M.g + i * M.cols, *g1 = M.g + i1 * M.cols;
    const float* next0 = M.g + std::min(i + 2, end - 1) * M.cols;    // prefetched: see product_rows_impl
    const float* next1 = M.g + std::min(i + 3, end - 1) * M.cols;
    if (kBuffered) {
      for (int64_t j = 0; j < stride; j += kVecLanes) {
        const Vec b0 = moment_chunk<true, kRepair>(V, wv0, g0, j), b1 = moment_chunk<true, kRepair>(V, wv1, g1, j);
        std::memcpy(row0 + j, &b0, sizeof b0);
        std::memcpy(row1 + j, &b1, sizeof b1);
      }
    }
    for (int64_t q0 = 0; q0 < width; q0 += kPairBlock) {
      Vec sum[16] = {};       // row i: M's 4 sums, V's 4; then row i1's
      for (int64_t j = 0; j < stride; j += kVecLanes) {
        __builtin_prefetch(next0 + j);
        __builtin_prefetch(next1 + j);
        const Vec a0 = g_chunk(g0, M.cols, j), a1 = g_chunk(g1, M.cols, j);
        const Vec b0 = kBuffered ? load_vec(row0 + j) : new_chunk<true, kRepair>(V, wv0, a0, j);
        const Vec b1 = kBuffered ? load_vec(row1 + j) : new_chunk<true, kRepair>(V, wv1, a1, j);
        for (int64_t q = 0; q < kPairBlock; ++q) {
          const Vec xm = load_vec(Xt_m + (q0 + q) * stride + j), xv = load_vec(Xt_v + (q0 + q) * stride + j);
          sum[q] += a0 * xm;
          sum[4 + q] += b0 * xv;
          sum[8 + q] += a1 * xm;
          sum[12 + q] += b1 * xv;
        }
      }
      float total[16];
      lane_totals(sum, total);
      add_factors_part(M, total, kPairBlock, wm0, 1, vhx + q0, padded_width);
      add_factors_part(M, total + 8, kPairBlock, wm1, 1, vhx + q0, padded_width);
      for (int64_t q = 0; q < kPairBlock && q0 + q < width; ++q) {
        out_m[i * width + q0 + q] = total[q];
        out_v[i * width + q0 + q] = total[4 + q];
        if (i1 != i) {
          out_m[i1 * width + q0 + q] = total[8 + q];
          out_v[i1 * width + q0 + q] = total[12 + q];
        }
      }
    }
  }
}

// One chunk j of the kPairBlock columns [q0, q0 + kPairBlock) of M^T X_m and V^T X_v (rows of
// stride floats in out_m and out_v), summed over the rows [first, last) of a block in registers:
// chunks(i, a, b) gives row i's chunk of M's loop input (g, M being split) and of V. The first
// block of a range (first == begin) writes the sums, the others add to them.
template <class Chunks>
__attribute__((always_inline)) inline void pair_block_sums(const Chunks& chunks, const float* X_m,
                                                           const float* X_v, int64_t x_stride,
                                                           int64_t begin, int64_t first, int64_t last,
                                                           int64_t j, int64_t q0, int64_t stride,
                                                           float* out_m, float* out_v) {
  Vec sum[2 * kPairBlock] = {};                  // M's, then V's
  if (first != begin)
    for (int64_t q = 0; q < kPairBlock; ++q) {
      sum[q] = load_vec(out_m + (q0 + q) * stride + j);
      sum[kPairBlock + q] = load_vec(out_v + (q0 + q) * stride + j);
    }
  for (int64_t i = first; i < last; ++i) {
    Vec a, b;
    chunks(i, a, b);
    const float *xm = X_m + i * x_stride + q0, *xv = X_v + i * x_stride + q0;
    for (int64_t q = 0; q < kPairBlock; ++q) {
      sum[q] += a * xm[q];
      sum[kPairBlock + q] += b * xv[q];
    }
  }
  for (int64_t q = 0; q < kPairBlock; ++q) {
    std::memcpy(out_m + (q0 + q) * stride + j, &sum[q], sizeof(Vec));
    std::memcpy(out_v + (q0 + q) * stride + j, &sum[kPairBlock + q], sizeof(Vec));
  }
}

// rows [begin, end)'s share of M^T X_m and V^T X_v, written to out_m and out_v (round_up8(width),
// stride each), as accumulate_rows_impl's: rows in blocks of kRowBlock, for each chunk kPairBlock
// columns of each product in registers while the block's rows go by. M's (U s)^T X_m goes to usx.
// w: kRowBlock (r_m + r_v) floats.
template <bool kRepair, bool kBuffered>
__attribute__((always_inline)) inline void pair_accumulate_rows_impl(
    const NewMoment& M, const NewMoment& V, const float* X_m, const float* X_v, int64_t width,
    int64_t begin, int64_t end, float* out_m, float* out_v, float* usx, float* w) {
  const int64_t x_stride = round_up8(width), stride = M.old.stride, r_mv = M.old.r + V.old.r;
  Vec g_chunks[kRowBlock], v_chunks[kRowBlock];
  for (int64_t first = begin; first < end; first += kRowBlock) {
    const int64_t last = std::min(end, first + kRowBlock);
    for (int64_t i = first; i < last; ++i) {
      float* wi = w + (i - first) * r_mv;
      M.old.weights(i, wi);
      V.old.weights(i, wi + M.old.r);
      for (int64_t k = 0; k < M.old.r; ++k)            // (U s)^T X_m, row by row
        for (int64_t q = 0; q < x_stride; ++q) usx[k * x_stride + q] += wi[k] * X_m[i * x_stride + q];
    }
    const auto chunks = [&](int64_t i, int64_t j, Vec& a, Vec& b) {
      __builtin_prefetch(M.g + std::min(i + kRowBlock, end - 1) * M.cols + j);   // see accumulate_rows_impl
      a = g_chunk(M.g + i * M.cols, M.cols, j);
      b = new_chunk<true, kRepair>(V, w + (i - first) * r_mv + M.old.r, a, j);
    };
    for (int64_t j = 0; j < stride; j += kVecLanes) {
      if (kBuffered)
        for (int64_t i = first; i < last; ++i) chunks(i, j, g_chunks[i - first], v_chunks[i - first]);
      const auto row_chunks = [&](int64_t i, Vec& a, Vec& b) {
        if (kBuffered) {
          a = g_chunks[i - first];
          b = v_chunks[i - first];
        } else {
          chunks(i, j, a, b);
        }
      };
      for (int64_t q0 = 0; q0 < width; q0 += kPairBlock)
        pair_block_sums(row_chunks, X_m, X_v, x_stride, begin, first, last, j, q0, stride, out_m, out_v);
    }
  }
}

void pair_product_rows(const NewMoment& M, const NewMoment& V, const float* Xt_m, const float* Xt_v,
                       const float* vhx, int64_t width, int64_t begin, int64_t end, float* out_m,
                       float* out_v, float* w, float* rows) {
  const auto run = [&](auto repair, auto buffered) {
    pair_product_rows_impl<repair.value, buffered.value>(M, V, Xt_m, Xt_v, vhx, width, begin, end, out_m,
                                                         out_v, w, rows);
  };
  pair_kind(V, width, run);
}

void pair_accumulate_rows(const NewMoment& M, const NewMoment& V, const float* X_m, const float* X_v,
                          int64_t width, int64_t begin, int64_t end, float* out_m, float* out_v,
                          float* usx, float* w) {
  const auto run = [&](auto repair, auto buffered) {
    pair_accumulate_rows_impl<repair.value, buffered.value>(M, V, X_m, X_v, width, begin, end, out_m,
                                                            out_v, usx, w);
  };
  pair_kind(V, width, run);
}

// ---------------------------------------------------------------------------------------------------
// adamw_update_products_'s loop

// rows [begin, end) of MLorc_AdamW's pass (adamw_rows) that also adds the rows' share of [M4]'s last
// products, M^T X_m and V^T X_v of the new moments, into out_m and out_v (round_up8(width), stride
// each), as pair_accumulate_rows_impl does, from the entries the pass computes instead of rebuilt
// ones: rows go in blocks of kRowBlock, each row's new v kept in v_rows (kRowBlock rows of stride
// floats, zeros past cols) until its block's products are added; M = beta1 m~ + (1 - beta1) g is
// split, so the loops multiply g, and the rows' (U s)^T X_m goes to usx. m_row, v_row and k_row
// hold one rebuilt row each; w: r_m + r_v + r_k floats.
void adamw_accumulate_rows(const AdamWArgs args, const Factors& m_old, const Factors& v_old,
                           const Factors& kept, int64_t begin, int64_t end, int64_t cols, float* p,
                           const float* g, const float* X_m, const float* X_v, int64_t width,
                           float* out_m, float* out_v, float* usx, float* m_row, float* v_row,
                           float* k_row, float* v_rows, float* w) {
  const int64_t x_stride = round_up8(width), stride = m_old.stride;
  if (kept.r == 0) std::memset(k_row, 0, kept.stride * sizeof(float));
  for (int64_t first = begin; first < end; first += kRowBlock) {
    const int64_t last = std::min(end, first + kRowBlock);
    for (int64_t i = first; i < last; ++i) {
      rebuild_row(m_old, i, w, m_row);                  // leaves U[i, :] s in w
      rebuild_row(v_old, i, w + m_old.r, v_row);
      if (kept.r > 0) rebuild_row(kept, i, w + m_old.r + v_old.r, k_row);
      adamw_row(args, cols, p + i * cols, g + i * cols, m_row, v_row, k_row, nullptr,
                v_rows + (i - first) * stride);
      for (int64_t k = 0; k < m_old.r; ++k)              // (U s)^T X_m, row by row
        for (int64_t q = 0; q < x_stride; ++q) usx[k * x_stride + q] += w[k] * X_m[i * x_stride + q];
    }
    for (int64_t j = 0; j < stride; j += kVecLanes) {
      const auto row_chunks = [&](int64_t i, Vec& a, Vec& b) {
        a = g_chunk(g + i * cols, cols, j);
        b = load_vec(v_rows + (i - first) * stride + j);
      };
      for (int64_t q0 = 0; q0 < width; q0 += kPairBlock)
        pair_block_sums(row_chunks, X_m, X_v, x_stride, begin, first, last, j, q0, stride, out_m, out_v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// kept_part's loop

// rows [begin, end) of g (rows of cols floats): g Vh^T into gv (rows, r) and the rows' share of U^T g
// added into utg (round_up8(r), stride), in one pass over g, two rows at a time. For each block of
// kBlock of the r terms, each chunk of the two rows is multiplied into 2 x kBlock running sums (the
// dot products with Vh's rows; lanes added at the end, lane_totals) and added, times U's entries,
// into utg's rows. vh is Vh with zero rows and columns to (round_up8(r), stride); U is (rows, r). A
// lone last row pairs with itself, with weight 0 in utg.
template <int64_t kBlock>
__attribute__((always_inline)) inline void kept_rows_impl(const float* U, const float* vh, int64_t r,
                                                          int64_t stride, const float* g, int64_t cols,
                                                          int64_t begin, int64_t end, float* gv,
                                                          float* utg) {
  for (int64_t i = begin; i < end; i += 2) {
    const int64_t i1 = std::min(i + 1, end - 1);
    const float *g0 = g + i * cols, *g1 = g + i1 * cols;
    const float* next0 = g + std::min(i + 2, end - 1) * cols;      // prefetched: see product_rows_impl
    const float* next1 = g + std::min(i + 3, end - 1) * cols;
    for (int64_t k0 = 0; k0 < r; k0 += kBlock) {
      float u0[kBlock], u1[kBlock];
      for (int64_t q = 0; q < kBlock; ++q) {
        u0[q] = k0 + q < r ? U[i * r + k0 + q] : 0.f;
        u1[q] = k0 + q < r && i1 != i ? U[i1 * r + k0 + q] : 0.f;
      }
      Vec sum[16] = {};       // row i's kBlock dot products, then row i1's (lane_totals takes 16)
      for (int64_t j = 0; j < stride; j += kVecLanes) {
        __builtin_prefetch(next0 + j);
        __builtin_prefetch(next1 + j);
        const Vec a0 = g_chunk(g0, cols, j), a1 = g_chunk(g1, cols, j);
        for (int64_t q = 0; q < kBlock; ++q) {
          const Vec x = load_vec(vh + (k0 + q) * stride + j);
          sum[q] += a0 * x;
          sum[kBlock + q] += a1 * x;
          float* t = utg + (k0 + q) * stride + j;
          const Vec share = load_vec(t) + a0 * u0[q] + a1 * u1[q];
          std::memcpy(t, &share, sizeof share);
        }
      }
      float total[16];
      lane_totals(sum, total);
      for (int64_t q = 0; q < kBlock && k0 + q < r; ++q) {
        gv[i * r + k0 + q] = total[q];
        if (i1 != i) gv[i1 * r + k0 + q] = total[kBlock + q];
      }
    }
  }
}

// kept_rows_impl with blocks of 4 terms for r <= 4 (the default rank: 8 would do half its work on
// zeros), else 8
void kept_rows(const float* U, const float* vh, int64_t r, int64_t stride, const float* g, int64_t cols,
               int64_t begin, int64_t end, float* gv, float* utg) {
  if (r <= 4)
    kept_rows_impl<4>(U, vh, r, stride, g, cols, begin, end, gv, utg);
  else
    kept_rows_impl<8>(U, vh, r, stride, g, cols, begin, end, gv, utg);
}
