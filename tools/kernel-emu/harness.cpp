// Host emulation harness for kernels/attention.cu and kernels/gru.cu (run by tools/kernel-emu/run.sh):
// random shapes incl. odd ones (len 1/35/36/64, dh not a multiple of 4, misaligned buffers for the
// scalar path, idle GRU items), outputs poisoned with NaN, relative-norm error vs float64 <= 1e-5.
#include "shim.h"
#include <cstdio>
#include <random>
#include "attention_host.cu"
namespace attention { float4 attn_fwd_smem[11000]; float4 attn_bwd_smem[11000]; }
#include "gru_host.cu"

static std::mt19937_64 rng(42);
static std::vector<float> randv(size_t n, float lo = -1, float hi = 1) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}
static double relerr(const std::vector<float>& g, const std::vector<double>& w, const char* what, bool nanmask_ok = false) {
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isnan(w[i])) {
      if (!std::isnan(g[i])) { printf("  %s: element %zu written but should not be\n", what, i); return 1e9; }
      continue;
    }
    if (!std::isfinite(g[i])) { printf("  %s: element %zu = %f\n", what, i, g[i]); return 1e9; }
    num += (g[i] - w[i]) * (g[i] - w[i]);
    den += w[i] * w[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Reference in double, straight from the CPU twin's equations.
static void ref_attention(const std::vector<float>& qkv, const std::vector<uint32_t>& off, int heads, int dh,
                          const std::vector<float>& dout, std::vector<double>& out, std::vector<double>& probs,
                          std::vector<double>& dqkv) {
  int items = off.size() - 1, d = heads * dh, tokens = off.back();
  double scale = 1.0 / std::sqrt((double)dh);
  out.assign((size_t)tokens * d, 0); dqkv.assign((size_t)tokens * 3 * d, 0); probs.clear();
  for (int b = 0; b < items; ++b) {
    int s = off[b], L = off[b + 1] - s;
    for (int h = 0; h < heads; ++h) {
      auto Q = [&](int i, int c) { return (double)qkv[(size_t)(s + i) * 3 * d + h * dh + c]; };
      auto K = [&](int i, int c) { return (double)qkv[(size_t)(s + i) * 3 * d + d + h * dh + c]; };
      auto V = [&](int i, int c) { return (double)qkv[(size_t)(s + i) * 3 * d + 2 * d + h * dh + c]; };
      auto dO = [&](int i, int c) { return (double)dout[(size_t)(s + i) * d + h * dh + c]; };
      std::vector<double> P(L * L), dP(L * L);
      for (int i = 0; i < L; ++i) {
        double m = -1e300;
        for (int j = 0; j < L; ++j) { double a = 0; for (int c = 0; c < dh; ++c) a += Q(i, c) * K(j, c); P[i * L + j] = a * scale; m = std::max(m, P[i * L + j]); }
        double sum = 0;
        for (int j = 0; j < L; ++j) { P[i * L + j] = std::exp(P[i * L + j] - m); sum += P[i * L + j]; }
        for (int j = 0; j < L; ++j) P[i * L + j] /= sum;
      }
      for (double p : P) probs.push_back(p);
      for (int i = 0; i < L; ++i)
        for (int c = 0; c < dh; ++c) { double a = 0; for (int j = 0; j < L; ++j) a += P[i * L + j] * V(j, c); out[(size_t)(s + i) * d + h * dh + c] = a; }
      for (int j = 0; j < L; ++j)
        for (int c = 0; c < dh; ++c) { double a = 0; for (int i = 0; i < L; ++i) a += P[i * L + j] * dO(i, c); dqkv[(size_t)(s + j) * 3 * d + 2 * d + h * dh + c] = a; }
      for (int i = 0; i < L; ++i) {
        for (int j = 0; j < L; ++j) { double a = 0; for (int c = 0; c < dh; ++c) a += dO(i, c) * V(j, c); dP[i * L + j] = a; }
        double dot = 0; for (int j = 0; j < L; ++j) dot += P[i * L + j] * dP[i * L + j];
        for (int j = 0; j < L; ++j) dP[i * L + j] = P[i * L + j] * (dP[i * L + j] - dot) * scale;
      }
      for (int i = 0; i < L; ++i)
        for (int c = 0; c < dh; ++c) {
          double a = 0, k2 = 0;
          for (int j = 0; j < L; ++j) { a += dP[i * L + j] * K(j, c); k2 += dP[j * L + i] * Q(j, c); }
          dqkv[(size_t)(s + i) * 3 * d + h * dh + c] = a;
          dqkv[(size_t)(s + i) * 3 * d + d + h * dh + c] = k2;
        }
    }
  }
}

static int fails = 0;
static void check_attention(std::vector<int> lengths, int heads, int dh, bool misalign = false) {
  std::vector<uint32_t> off{0};
  for (int l : lengths) off.push_back(off.back() + l);
  int tokens = off.back(), d = heads * dh, items = lengths.size();
  size_t nprobs = 0; int maxl = 0;
  for (int l : lengths) { nprobs += (size_t)heads * l * l; maxl = std::max(maxl, l); }
  // misalign: shift buffers by one float so the kernel must take its scalar path.
  int sh = misalign ? 1 : 0;
  std::vector<float> qkv_buf = randv((size_t)tokens * 3 * d + 4), dout_buf = randv((size_t)tokens * d + 4);
  std::vector<float> qkv(qkv_buf.begin() + sh, qkv_buf.begin() + sh + (size_t)tokens * 3 * d);
  std::vector<float> dout(dout_buf.begin() + sh, dout_buf.begin() + sh + (size_t)tokens * d);
  std::vector<float> out((size_t)tokens * d + 4, NAN), probs(nprobs, NAN), dqkv((size_t)tokens * 3 * d + 4, NAN);
  int lp = (maxl + 3) / 4 * 4, dp = (dh + 3) / 4 * 4;
  unsigned threads = std::max(1, (lp / 4) * (dp / 4));
  threads = (threads + 31) / 32 * 32;
  float scale = 1.0f / std::sqrt((float)dh);
  const float* qp = qkv_buf.data() + sh; const float* dop = dout_buf.data() + sh;
  // copy qkv into the (possibly shifted) buffer positions
  std::copy(qkv.begin(), qkv.end(), qkv_buf.begin() + sh);
  float* op = out.data() + sh; float* dqp = dqkv.data() + sh;
  launch(items * heads, threads, [&] { attention_fwd_f32(qp, off.data(), heads, dh, maxl, scale, op, probs.data()); });
  launch(items * heads, threads, [&] { attention_bwd_f32(qp, probs.data(), off.data(), heads, dh, maxl, scale, dop, dqp); });
  std::vector<double> ro, rp, rd;
  ref_attention(qkv, off, heads, dh, dout, ro, rp, rd);
  std::vector<float> o2(op, op + (size_t)tokens * d), d2(dqp, dqp + (size_t)tokens * 3 * d);
  double e1 = relerr(o2, ro, "out"), e2 = relerr(probs, rp, "probs"), e3 = relerr(d2, rd, "dqkv");
  bool ok = e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5;
  // nothing past the end written
  for (int i = 0; i < 4 - sh; ++i) if (!std::isnan(out[(size_t)tokens * d + sh + i]) || !std::isnan(dqkv[(size_t)tokens * 3 * d + sh + i])) ok = false;
  fails += !ok;
  printf("%s attention items %d heads %d dh %d maxlen %d threads %u%s: out %.2e probs %.2e dqkv %.2e\n", ok ? "ok  " : "FAIL",
         items, heads, dh, maxl, threads, misalign ? " (misaligned)" : "", e1, e2, e3);
}

// An item longer than the launch was sized for must come back as NaN, never as a wrong number.
static void check_overlong() {
  std::vector<uint32_t> off{0, 5, 13};
  int heads = 2, dh = 8, d = heads * dh, tokens = 13;
  auto qkv = randv((size_t)tokens * 3 * d), dout = randv((size_t)tokens * d);
  std::vector<float> out((size_t)tokens * d, 0.0f), probs(2 * (25 + 64), 0.0f), dq((size_t)tokens * 3 * d, 0.0f);
  launch(4, 32, [&] { attention_fwd_f32(qkv.data(), off.data(), heads, dh, 5, 0.35f, out.data(), probs.data()); });
  launch(4, 32, [&] { attention_bwd_f32(qkv.data(), probs.data(), off.data(), heads, dh, 5, 0.35f, dout.data(), dq.data()); });
  bool ok = true;
  for (int r = 0; r < tokens; ++r)
    for (int c = 0; c < d; ++c) ok &= (r >= 5) == std::isnan(out[r * d + c]);
  for (int r = 0; r < tokens; ++r)
    for (int c = 0; c < 3 * d; ++c) ok &= (r >= 5) == std::isnan(dq[r * 3 * d + c]);
  fails += !ok;
  printf("%s attention item longer than max_len: its outputs are NaN, the other item's finite\n", ok ? "ok  " : "FAIL");
}

static double sig(double x) { return 1 / (1 + std::exp(-x)); }
static void check_gru(std::vector<int> lengths, int H, int extra) {
  std::vector<uint32_t> off{0};
  for (int l : lengths) off.push_back(off.back() + l);
  int tokens = off.back(), items = lengths.size(), maxl = *std::max_element(lengths.begin(), lengths.end());
  int oc = 2 * H + extra;
  for (int rev = 0; rev < 2; ++rev)
    for (int s : {0, maxl / 2, maxl - 1, maxl}) {
      auto x = randv((size_t)tokens * 3 * H), hp = randv((size_t)items * 3 * H), h = randv((size_t)items * H);
      std::vector<float> out((size_t)tokens * oc, NAN), gates((size_t)items * 4 * H, NAN), h0 = h;
      launch(3, 64, [&] { gru_step_fwd_f32(x.data(), hp.data(), h.data(), out.data(), gates.data(), off.data(), items, H, s, rev, oc, rev ? H : 0); });
      std::vector<double> rh(h0.begin(), h0.end()), ro((size_t)tokens * oc, NAN), rg((size_t)items * 4 * H, 0);
      for (int b = 0; b < items; ++b) {
        int L = lengths[b]; if (s >= L) continue;
        int row = off[b] + (rev ? L - 1 - s : s);
        for (int i = 0; i < H; ++i) {
          double r = sig((double)x[row * 3 * H + i] + hp[b * 3 * H + i]), z = sig((double)x[row * 3 * H + H + i] + hp[b * 3 * H + H + i]);
          double n = std::tanh((double)x[row * 3 * H + 2 * H + i] + r * hp[b * 3 * H + 2 * H + i]);
          double hn = (1 - z) * n + z * h0[b * H + i];
          rh[b * H + i] = hn; ro[(size_t)row * oc + (rev ? H : 0) + i] = hn;
          rg[b * 4 * H + i] = r; rg[b * 4 * H + H + i] = z; rg[b * 4 * H + 2 * H + i] = n; rg[b * 4 * H + 3 * H + i] = hp[b * 3 * H + 2 * H + i];
        }
      }
      double e1 = relerr(h, rh, "h"), e2 = relerr(out, ro, "out"), e3 = relerr(gates, rg, "gates");
      // backward
      auto g = randv((size_t)items * 4 * H, 0.01, 0.99), hprev = randv((size_t)items * H), dout = randv((size_t)tokens * oc), dh = randv((size_t)items * H);
      std::vector<float> dx((size_t)tokens * 3 * H, NAN), dhp((size_t)items * 3 * H, NAN), dh0 = dh;
      launch(2, 96, [&] { gru_step_bwd_f32(g.data(), hprev.data(), dout.data(), dh.data(), dx.data(), dhp.data(), off.data(), items, H, s, rev, oc, rev ? H : 0); });
      std::vector<double> rdh(dh0.begin(), dh0.end()), rdx((size_t)tokens * 3 * H, NAN), rdhp((size_t)items * 3 * H, 0);
      for (int b = 0; b < items; ++b) {
        int L = lengths[b]; if (s >= L) continue;
        int row = off[b] + (rev ? L - 1 - s : s);
        for (int i = 0; i < H; ++i) {
          double r = g[b * 4 * H + i], z = g[b * 4 * H + H + i], n = g[b * 4 * H + 2 * H + i], hn = g[b * 4 * H + 3 * H + i];
          double dd = (double)dh0[b * H + i] + dout[(size_t)row * oc + (rev ? H : 0) + i];
          double da_n = dd * (1 - z) * (1 - n * n), da_r = da_n * hn * r * (1 - r), da_z = dd * (hprev[b * H + i] - n) * z * (1 - z);
          rdx[row * 3 * H + i] = da_r; rdx[row * 3 * H + H + i] = da_z; rdx[row * 3 * H + 2 * H + i] = da_n;
          rdhp[b * 3 * H + i] = da_r; rdhp[b * 3 * H + H + i] = da_z; rdhp[b * 3 * H + 2 * H + i] = da_n * r;
          rdh[b * H + i] = dd * z;
        }
      }
      double e4 = relerr(dh, rdh, "dh"), e5 = relerr(dx, rdx, "dx"), e6 = relerr(dhp, rdhp, "dhproj");
      bool ok = std::max({e1, e2, e3, e4, e5, e6}) < 1e-5;
      fails += !ok;
      printf("%s gru items %d H %d s %d rev %d: %.1e %.1e %.1e | %.1e %.1e %.1e\n", ok ? "ok  " : "FAIL", items, H, s, rev, e1, e2, e3, e4, e5, e6);
    }
}

int main() {
  check_attention({36, 36}, 8, 128);
  check_attention({35, 36, 1, 24, 17}, 4, 64);
  check_attention({64, 3}, 2, 128);
  check_attention({64}, 1, 64);
  check_attention({1}, 1, 64);
  check_attention({1, 1, 1}, 3, 128);
  check_attention({5, 64, 2}, 3, 13);
  check_attention({36, 7}, 2, 1);
  check_attention({9, 33}, 2, 126);
  check_attention({36, 20}, 2, 64, true);
  check_attention({17, 3}, 2, 8, true);
  std::mt19937 r(7);
  for (int c = 0; c < 12; ++c) {
    int items = 1 + r() % 4; std::vector<int> ls;
    for (int i = 0; i < items; ++i) ls.push_back(1 + r() % 64);
    check_attention(ls, 1 + r() % 4, 1 + r() % 128);
  }
  check_overlong();
  check_gru({24, 1, 7, 24, 3}, 128, 0);
  check_gru({5}, 7, 3);
  check_gru({1}, 1, 0);
  check_gru({64, 2, 35, 36}, 7, 1);
  printf("%d failures\n", fails);
  return fails != 0;
}
