// Binary GEMM / indirect-conv tile driver, compiled once per ISA.
//
// NOT a normal header: kernels/cpu/binary.cpp includes it several times, each time inside a namespace and a
// `#pragma GCC target` region for one instruction-set level, after defining in that namespace
//   template <bool AND> void mk(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel,
//                               int32_t* acc);
// the MR x NR micro-kernel: acc[i*NR + j] = sum_{t<T, w<Cw} popcount(a[i*T+t][w] OP panel[(t*Cw + w)*NR + j]),
// OP = AND or XOR, `kHasMk2` / `mk2` (the same for two channel blocks at once; a no-op stub when absent) with
// `mk2_tail` (the same on the first `rows` < MR rows of a partial block), and
// `kHasVecEpi` / `vec_epilogue` (a register form of the float/bits/fused epilogue; a stub when absent). Everything here (pointer set-up, epilogue) is then compiled for that level, so the epilogue
// vectorises with the same registers as the micro-kernel. Types (Ctx, RowInfo, MR, NR, kEpi*) come from binary.cpp.

static inline int32_t popc32(uint32_t v) { return __builtin_popcount(v); }

// Output pixel coordinates of consecutive rows without a division per row.
struct PixelCursor {
  int64_t n = 0, oh = 0, ow = 0;
  void seek(const Ctx& c, int64_t p) {
    const int64_t hw = c.Ho * c.Wo;
    n = p / hw;
    const int64_t rem = p - n * hw;
    oh = rem / c.Wo;
    ow = rem - oh * c.Wo;
  }
  void next(const Ctx& c) {
    if (++ow == c.Wo) {
      ow = 0;
      if (++oh == c.Ho) {
        oh = 0;
        ++n;
      }
    }
  }
};

// Tap pointers of output row p (conv: indirect, padded taps -> c.zbuf; GEMM: one pointer) and its row facts.
// For conv, `pc` holds the coordinates of p.
template <bool CONV>
inline void setup_row(const Ctx& c, int64_t p, const PixelCursor& pc, const uint32_t** pi, RowInfo& ri) {
  const int64_t T = c.T, Cw = c.Cw;
  int32_t apop = 0;  // from the per-pixel table c.xpop, when there is one
  if (CONV) {
    const int64_t n = pc.n, oh = pc.oh, ow = pc.ow;
    const int64_t ih0 = oh * c.sh - c.ph, iw0 = ow * c.sw - c.pw;
    int64_t valid = 0;
    if (ih0 >= 0 && ih0 + (c.kh - 1) * c.dh < c.H && iw0 >= 0 && iw0 + (c.kw - 1) * c.dw < c.W) {
      // interior: every tap is valid, pointers are a fixed stencil around the first tap
      const uint32_t* base = c.x + ((n * c.H + ih0) * c.W + iw0) * Cw;
      const int64_t row_step = c.dh * c.W * Cw, col_step = c.dw * Cw;
      for (int64_t r = 0; r < c.kh; ++r)
        for (int64_t s = 0; s < c.kw; ++s) pi[r * c.kw + s] = base + r * row_step + s * col_step;
      if (c.xpop) {
        const int32_t* xp = c.xpop + (n * c.H + ih0) * c.W + iw0;
        for (int64_t r = 0; r < c.kh; ++r)
          for (int64_t s = 0; s < c.kw; ++s) apop += xp[r * c.dh * c.W + s * c.dw];
      }
      valid = T;
    } else {
      uint64_t pad = 0;
      for (int64_t r = 0; r < c.kh; ++r) {
        const int64_t ih = oh * c.sh - c.ph + r * c.dh;
        const bool row_ok = ih >= 0 && ih < c.H;
        for (int64_t s = 0; s < c.kw; ++s) {
          const int64_t iw = ow * c.sw - c.pw + s * c.dw;
          if (row_ok && iw >= 0 && iw < c.W) {
            pi[r * c.kw + s] = c.x + ((n * c.H + ih) * c.W + iw) * Cw;
            if (c.xpop) apop += c.xpop[(n * c.H + ih) * c.W + iw];
            ++valid;
          } else {
            pi[r * c.kw + s] = c.zbuf;
            if (r * c.kw + s < 64) pad |= uint64_t{1} << (r * c.kw + s);
          }
        }
      }
      ri.pad_taps = pad;
    }
    ri.nv = static_cast<int32_t>(valid * c.c_in);
    ri.border = valid != T;
  } else {
    pi[0] = c.x + p * Cw;
    ri.nv = static_cast<int32_t>(c.c_in);
    ri.border = false;
  }
  if (c.need_apop) {
    int32_t s = apop;
    if (!(CONV && c.xpop))
      for (int64_t t = 0; t < T; ++t)
        for (int64_t w = 0; w < Cw; ++w) s += popc32(pi[t][w]);  // zero words add 0
    ri.apop = s;
    ri.asum = static_cast<float>(2 * s - ri.nv);
  } else {
    ri.apop = 0;
    ri.asum = 0.f;
  }
}

inline void setup_missing_row(const Ctx& c, const uint32_t** pi, RowInfo& ri) {
  for (int64_t t = 0; t < c.T; ++t) pi[t] = c.zbuf;
  ri.nv = 0;
  ri.apop = 0;
  ri.asum = 0.f;
  ri.border = false;
}

// Epilogue of output row p, channel block cb (NR channels). DOT: acc holds sum s_a*s_w over the valid taps
// (or sum a*s_w for kEpiAnd01); otherwise acc holds popcount(a OP w) over all taps, padded taps on zero words.
template <bool CONV, int EPI, bool DOT>
inline void epilogue_row(const Ctx& c, int64_t cb, int64_t p, const uint32_t* const* pi, const RowInfo& ri,
                         const int32_t* acc) {
  if constexpr (kHasVecEpi && !DOT && (EPI == kEpiFloat || EPI == kEpiBits || EPI == kEpiFused)) {
    vec_epilogue<CONV, EPI>(c, cb, p, pi, ri, acc);  // this ISA's register form of the code below
    return;
  }
  const int64_t col0 = cb * NR;
  const int ncols = static_cast<int>(std::min<int64_t>(NR, c.Nout - col0));
  if (EPI == kEpiFloat || EPI == kEpiBits || EPI == kEpiFused) {
    const float* sc = c.scale + col0;
    const float* as = c.ass + col0;
    const float* ws = c.wss + col0;
    const float* cs = c.cs + col0;
    const float* bi = c.bias + col0;
    const int32_t* wt = c.wpop_tot + col0;
    int32_t inv[NR];  // popcount of the weight words of this position's padded taps (conv borders)
    for (int j = 0; j < NR; ++j) inv[j] = 0;
    if (CONV && ri.border) {
      const int32_t* wp = c.wpop + cb * c.T * NR;
      if (c.T <= 64) {
        for (uint64_t m = ri.pad_taps; m != 0; m &= m - 1)
          for (int j = 0; j < NR; ++j) inv[j] += wp[__builtin_ctzll(m) * NR + j];
      } else {
        for (int64_t t = 0; t < c.T; ++t)
          if (pi[t] == c.zbuf)
            for (int j = 0; j < NR; ++j) inv[j] += wp[t * NR + j];
      }
    }
    const int32_t n_valid = ri.nv;
    const float a_sum = ri.asum;
    float y[NR];
    for (int j = 0; j < NR; ++j) {
      // XOR form: popcount(a ^ w) over the valid taps = acc - inv (padded taps saw zero activation words)
      const int32_t dot = DOT ? acc[j] : n_valid - 2 * (acc[j] - inv[j]);
      float v = sc[j] * static_cast<float>(dot) + bi[j];
      v += as[j] * a_sum;
      if (CONV) {
        const float w_sum = static_cast<float>(2 * (wt[j] - inv[j]) - n_valid);
        v += ws[j] * w_sum + cs[j] * static_cast<float>(n_valid);
      }
      y[j] = v;
    }
    if (EPI == kEpiFused) {
      // the unfused deploy graph's operations in its order: y + residual, then Maxout (the forms of
      // kernels/cpu/elementwise.cpp, so the values are the same), then the float store and/or y >= threshold
      if (c.res) {
        const float* r = c.res + p * c.ldr + col0;
        for (int j = 0; j < ncols; ++j) y[j] += r[j];
      }
      if (c.mpos) {
        const float* mp = c.mpos + col0;
        const float* mn = c.mneg + col0;
        if (c.mo_finite) {
          for (int j = 0; j < NR; ++j) y[j] = y[j] * (y[j] > 0.f ? mp[j] : mn[j]);
        } else {
          for (int j = 0; j < NR; ++j) y[j] = mp[j] * std::max(y[j], 0.f) - mn[j] * std::max(-y[j], 0.f);
        }
      }
      if (c.out) {
        float* o = static_cast<float*>(c.out) + p * c.ldo + col0;
        for (int j = 0; j < ncols; ++j) o[j] = y[j];
      }
      if (c.outb) {
        const float* th = c.thr + col0;
        uint32_t bits = 0;
        for (int j = 0; j < NR; ++j) bits |= static_cast<uint32_t>(y[j] >= th[j]) << j;
        if (ncols < NR) bits &= (1u << ncols) - 1u;
        c.outb[p * c.ldb + cb] = static_cast<uint16_t>(bits);
      }
    } else if (EPI == kEpiFloat) {
      float* o = static_cast<float*>(c.out) + p * c.ldo + col0;
      if (ncols == NR) {
        for (int j = 0; j < NR; ++j) o[j] = y[j];
      } else {
        for (int j = 0; j < ncols; ++j) o[j] = y[j];
      }
    } else {
      const float* th = c.thr + col0;
      uint32_t bits = 0;
      for (int j = 0; j < NR; ++j) bits |= static_cast<uint32_t>(y[j] >= th[j]) << j;
      if (ncols < NR) bits &= (1u << ncols) - 1u;  // channels past C_out stay 0 (layout tail rule)
      static_cast<uint16_t*>(c.out)[p * c.ldo + cb] = static_cast<uint16_t>(bits);
    }
  } else {
    int32_t* o = static_cast<int32_t*>(c.out) + p * c.ldo + col0;
    int32_t r[NR];
    for (int j = 0; j < NR; ++j)
      r[j] = DOT ? acc[j] : (EPI == kEpiAnd01 ? 2 * acc[j] - ri.apop : ri.nv - 2 * acc[j]);
    for (int j = 0; j < ncols; ++j) o[j] = r[j];
  }
}

// Rows [pb0*MR, pb1*MR) x channel blocks [cb0, cb1) of one problem. `ptrs` is scratch for kPixelGroup*MR*T tap
// pointers. Pixel blocks go in groups of kPixelGroup: each channel block's weight panel then serves the whole group
// from L1 before the next panel is read (one pass over the panels per group instead of per block).
template <bool CONV, int EPI>
void tile(const Ctx& c, int64_t pb0, int64_t pb1, int64_t cb0, int64_t cb1, const uint32_t** ptrs) {
  const int64_t T = c.T, Cw = c.Cw;
  alignas(64) int32_t acc[MR * NR];
  alignas(64) int32_t acc2[MR * NR];
  RowInfo ri[kPixelGroup][MR];
  int rows[kPixelGroup];
  for (int64_t g0 = pb0; g0 < pb1; g0 += kPixelGroup) {
    const int ng = static_cast<int>(std::min<int64_t>(kPixelGroup, pb1 - g0));
    for (int gi = 0; gi < ng; ++gi) {
      const int64_t p0 = (g0 + gi) * MR;
      const uint32_t** gp = ptrs + gi * MR * T;
      rows[gi] = static_cast<int>(std::min<int64_t>(MR, c.P - p0));
      PixelCursor pc;
      if (CONV) pc.seek(c, p0);
      for (int i = 0; i < MR; ++i) {
        if (i < rows[gi]) {
          setup_row<CONV>(c, p0 + i, pc, gp + i * T, ri[gi][i]);
          if (CONV) pc.next(c);
        } else {
          setup_missing_row(c, gp + i * T, ri[gi][i]);
        }
      }
      if (((EPI == kEpiFused && (c.res || c.out)) || EPI == kEpiFloat) && binary_rows_prefetch()) {
        // the residual and float output rows two blocks ahead: read (or, for the store, owned) once, late, between
        // the micro-kernel's loads, they would otherwise wait on memory -- the hardware prefetchers miss them among
        // the tap streams (measured at batch 16 on Zen 5; a loss on Sapphire Rapids: binary_rows_prefetch)
        const int64_t ahead = p0 + 2 * MR, stop = std::min<int64_t>(c.P, ahead + MR);
        const int64_t col0 = cb0 * NR, col1 = std::min<int64_t>(c.Nout, cb1 * NR);
        float* const out = static_cast<float*>(c.out);
        for (int64_t q = ahead; q < stop; ++q)
          for (int64_t col = col0; col < col1; col += 16) {
            if (EPI == kEpiFused && c.res) __builtin_prefetch(c.res + q * c.ldr + col, 0, 3);
            if (out) __builtin_prefetch(out + q * c.ldo + col, 1, 3);
          }
      }
    }
    int64_t cb = cb0;
    if (kHasMk2) {
      for (; cb + 1 < cb1; cb += 2) {
        const uint32_t* pan0 = c.panels + cb * T * Cw * NR;
        const uint32_t* pan1 = c.panels + (cb + 1) * T * Cw * NR;
        for (int gi = 0; gi < ng; ++gi) {
          const int64_t p0 = (g0 + gi) * MR;
          const uint32_t* const* gp = ptrs + gi * MR * T;
          if (rows[gi] == MR)
            mk2<EPI == kEpiAnd01>(gp, T, Cw, pan0, pan1, acc, acc2);
          else
            mk2_tail<EPI == kEpiAnd01>(rows[gi], gp, T, Cw, pan0, pan1, acc, acc2);
          for (int i = 0; i < rows[gi]; ++i) {
            epilogue_row<CONV, EPI, false>(c, cb, p0 + i, gp + i * T, ri[gi][i], acc + i * NR);
            epilogue_row<CONV, EPI, false>(c, cb + 1, p0 + i, gp + i * T, ri[gi][i], acc2 + i * NR);
          }
        }
      }
    }
    for (; cb < cb1; ++cb) {
      const uint32_t* pan = c.panels + cb * T * Cw * NR;
      for (int gi = 0; gi < ng; ++gi) {
        const int64_t p0 = (g0 + gi) * MR;
        const uint32_t* const* gp = ptrs + gi * MR * T;
        mk<EPI == kEpiAnd01>(gp, T, Cw, pan, acc);
        for (int i = 0; i < rows[gi]; ++i)
          epilogue_row<CONV, EPI, false>(c, cb, p0 + i, gp + i * T, ri[gi][i], acc + i * NR);
      }
    }
  }
}
