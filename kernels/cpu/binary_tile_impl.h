// Binary GEMM / indirect-conv tile driver, compiled once per ISA.
//
// NOT a normal header: kernels/cpu/binary.cpp includes it several times, each time inside a namespace and a
// `#pragma GCC target` region for one instruction-set level, after defining in that namespace
//   template <bool AND> void mk(const uint32_t* const* a, int64_t T, int64_t Cw, const uint32_t* panel,
//                               int32_t* acc);
// the MR x NR micro-kernel: acc[i*NR + j] = sum_{t<T, w<Cw} popcount(a[i*T+t][w] OP panel[(t*Cw + w)*NR + j]),
// OP = AND or XOR. Everything here (pointer set-up, epilogue) is then compiled for that level, so the epilogue
// vectorises with the same registers as the micro-kernel. Types (Ctx, MR, NR, Epi) come from binary.cpp.

static inline int32_t popc32(uint32_t v) { return __builtin_popcount(v); }

// Rows [pb0*MR, pb1*MR) x channel blocks [cb0, cb1) of one problem. `ptrs` is scratch for MR*T tap pointers.
template <bool CONV, int EPI>
void tile(const Ctx& c, int64_t pb0, int64_t pb1, int64_t cb0, int64_t cb1, const uint32_t** ptrs) {
  const int64_t T = c.T, Cw = c.Cw;
  alignas(64) int32_t acc[MR * NR];
  int32_t nv[MR];
  int32_t apop[MR];
  float asum[MR];
  bool border[MR];
  for (int64_t pb = pb0; pb < pb1; ++pb) {
    const int64_t p0 = pb * MR;
    const int rows = static_cast<int>(std::min<int64_t>(MR, c.P - p0));
    // ---- tap pointers of the MR output positions (indirect GEMM; padded taps -> zero words)
    for (int i = 0; i < MR; ++i) {
      const uint32_t** pi = ptrs + i * T;
      if (i >= rows) {
        for (int64_t t = 0; t < T; ++t) pi[t] = c.zbuf;
        nv[i] = 0;
        apop[i] = 0;
        asum[i] = 0.f;
        border[i] = false;
        continue;
      }
      const int64_t p = p0 + i;
      if (CONV) {
        const int64_t hw = c.Ho * c.Wo;
        const int64_t n = p / hw, rem = p - n * hw, oh = rem / c.Wo, ow = rem - oh * c.Wo;
        int64_t valid = 0;
        for (int64_t r = 0; r < c.kh; ++r) {
          const int64_t ih = oh * c.sh - c.ph + r * c.dh;
          const bool row_ok = ih >= 0 && ih < c.H;
          for (int64_t s = 0; s < c.kw; ++s) {
            const int64_t iw = ow * c.sw - c.pw + s * c.dw;
            if (row_ok && iw >= 0 && iw < c.W) {
              pi[r * c.kw + s] = c.x + ((n * c.H + ih) * c.W + iw) * Cw;
              ++valid;
            } else {
              pi[r * c.kw + s] = c.zbuf;
            }
          }
        }
        nv[i] = static_cast<int32_t>(valid * c.c_in);
        border[i] = valid != T;
      } else {
        pi[0] = c.x + p * Cw;
        nv[i] = static_cast<int32_t>(c.c_in);
        border[i] = false;
      }
      if (c.need_apop) {
        int32_t s = 0;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t w = 0; w < Cw; ++w) s += popc32(pi[t][w]);  // zero words add 0
        apop[i] = s;
        asum[i] = static_cast<float>(2 * s - nv[i]);
      } else {
        apop[i] = 0;
        asum[i] = 0.f;
      }
    }
    // ---- all channel blocks of this row block
    for (int64_t cb = cb0; cb < cb1; ++cb) {
      mk<EPI == kEpiAnd01>(ptrs, T, Cw, c.panels + cb * T * Cw * NR, acc);
      const int64_t col0 = cb * NR;
      const int ncols = static_cast<int>(std::min<int64_t>(NR, c.Nout - col0));
      if (EPI == kEpiFloat || EPI == kEpiBits) {
        const float* sc = c.scale + col0;
        const float* as = c.ass + col0;
        const float* ws = c.wss + col0;
        const float* cs = c.cs + col0;
        const float* bi = c.bias + col0;
        const int32_t* wt = c.wpop_tot + col0;
        for (int i = 0; i < rows; ++i) {
          int32_t inv[NR];  // popcount of the weight words of this position's padded taps (conv borders)
          for (int j = 0; j < NR; ++j) inv[j] = 0;
          if (CONV && border[i]) {
            const int32_t* wp = c.wpop + cb * T * NR;
            for (int64_t t = 0; t < T; ++t)
              if (ptrs[i * T + t] == c.zbuf)
                for (int j = 0; j < NR; ++j) inv[j] += wp[t * NR + j];
          }
          const int32_t n_valid = nv[i];
          const float a_sum = asum[i];
          float y[NR];
          for (int j = 0; j < NR; ++j) {
            // popcount(a ^ w) over the valid taps; padded taps saw zero activation words, i.e. popcount(w)
            const int32_t mismatches = acc[i * NR + j] - inv[j];
            float v = sc[j] * static_cast<float>(n_valid - 2 * mismatches) + bi[j];
            v += as[j] * a_sum;
            if (CONV) {
              const float w_sum = static_cast<float>(2 * (wt[j] - inv[j]) - n_valid);
              v += ws[j] * w_sum + cs[j] * static_cast<float>(n_valid);
            }
            y[j] = v;
          }
          const int64_t p = p0 + i;
          if (EPI == kEpiFloat) {
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
        }
      } else {
        for (int i = 0; i < rows; ++i) {
          int32_t* o = static_cast<int32_t*>(c.out) + (p0 + i) * c.ldo + col0;
          int32_t r[NR];
          for (int j = 0; j < NR; ++j)
            r[j] = EPI == kEpiAnd01 ? 2 * acc[i * NR + j] - apop[i] : nv[i] - 2 * acc[i * NR + j];
          for (int j = 0; j < ncols; ++j) o[j] = r[j];
        }
      }
    }
  }
}
