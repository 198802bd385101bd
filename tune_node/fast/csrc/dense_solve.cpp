// The loops of tune_node.dense_solve in C++: the same ATen calls in the same order as
// the Python loops there (so the results are the same bit for bit), without the
// Python interpreter's cost per call, which is a large share of a small field's
// evaluation. Built on first use by tune_node.native.
#include <torch/extension.h>

#include <optional>
#include <utility>
#include <vector>

using at::Tensor;
using Coefficients = std::vector<std::pair<int64_t, double>>;

// zs, h2s, ks: the solve's buffers, indexed by evaluation; h1: one hidden-layer buffer.
Tensor forward_loop(const Tensor& z0, const Tensor& W1, const Tensor& c1, const Tensor& W2, const Tensor& c2,
                    const Tensor& W3t, const Tensor& c3t, const Tensor& zs_all, Tensor h1, const Tensor& h2s_all,
                    const Tensor& ks_all, const std::vector<Coefficients>& a, const Coefficients& b, int64_t steps) {
  const int64_t stages = static_cast<int64_t>(a.size());
  const int64_t evals = steps * stages;
  std::vector<Tensor> zs = zs_all.unbind(0), h2s = h2s_all.unbind(0), ks = ks_all.unbind(0);
  std::vector<Tensor> h2s_t = h2s_all.transpose(-1, -2).unbind(0), ks_t = ks_all.transpose(-1, -2).unbind(0);
  std::vector<Tensor> k(stages);
  zs[0].copy_(z0);
  Tensor z;
  int64_t e = 0;
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t i = 0; i < stages; ++i) {
      Tensor& zi = zs[e];
      if (i > 0) {
        const Coefficients& row = a[i];
        if (!row.empty()) {
          at::add_out(zi, zs[e - i], k[row[0].first], row[0].second);
          for (size_t r = 1; r < row.size(); ++r) zi.add_(k[row[r].first], row[r].second);
        } else {
          zi.copy_(zs[e - i]);
        }
      }
      at::baddbmm_out(h1, c1, zi, W1).relu_();
      at::baddbmm_out(h2s[e], c2, h1, W2).relu_();
      at::baddbmm_out(ks[e], c3t, W3t, h2s_t[e]);
      k[i] = ks_t[e];
      ++e;
    }
    z = e < evals ? zs[e] : at::empty_like(z0);
    at::add_out(z, zs[e - stages], k[b[0].first], b[0].second);
    for (size_t r = 1; r < b.size(); ++r) z.add_(k[b[r].first], b[r].second);
  }
  return z;
}

// Accumulates into gW1, gW2, gW3t and fills the per-evaluation bias sums; returns the
// gradient with respect to z0. bias sums of stages no gradient reaches are zeroed.
Tensor backward_loop(const Tensor& grad_z, const Tensor& W1, const Tensor& c1, const Tensor& W2, const Tensor& W3,
                     const Tensor& zs_all, Tensor h1, const Tensor& h2s_all, const Tensor& sums1_all,
                     const Tensor& sums2_all, const Tensor& sums3_all, Tensor gW1, Tensor gW2, Tensor gW3t,
                     const std::vector<Coefficients>& a, const Coefficients& b_pairs, int64_t steps) {
  const int64_t stages = static_cast<int64_t>(a.size());
  std::vector<std::optional<double>> b(stages);
  for (const auto& [i, coef] : b_pairs) b[i] = coef;
  const Tensor W1t = W1.transpose(-1, -2), W2t = W2.transpose(-1, -2), W3t = W3.transpose(-1, -2);
  const Tensor h1_t = h1.transpose(-1, -2);
  std::vector<Tensor> zs = zs_all.unbind(0), zs_t = zs_all.transpose(-1, -2).unbind(0), h2s = h2s_all.unbind(0);
  std::vector<Tensor> sums1 = sums1_all.unbind(0), sums2 = sums2_all.unbind(0), sums3 = sums3_all.unbind(0);
  Tensor g_hidden = at::empty_like(h2s[0]), g_first = at::empty_like(h2s[0]);
  Tensor gz = grad_z.contiguous().clone();
  std::vector<std::optional<std::pair<Tensor, double>>> g_stage(stages);
  int64_t e = zs_all.size(0);
  for (int64_t step = 0; step < steps; ++step) {
    e -= stages;
    for (int64_t i = 0; i < stages; ++i) {
      if (!b[i]) {
        g_stage[i].reset();
      } else if (stages > 1) {
        g_stage[i] = std::make_pair(gz * *b[i], 1.0);
      } else {
        g_stage[i] = std::make_pair(gz, *b[i]);
      }
    }
    for (int64_t stage = stages - 1; stage >= 0; --stage) {
      const int64_t i = e + stage;
      if (!g_stage[stage]) {
        sums1[i].zero_();
        sums2[i].zero_();
        sums3[i].zero_();
        continue;
      }
      const Tensor gk = g_stage[stage]->first;
      const double factor = g_stage[stage]->second;
      gW3t.baddbmm_(gk.transpose(-1, -2), h2s[i], 1, factor);
      at::sum_out(sums3[i], gk, {-2}, true);
      Tensor g = at::bmm_out(g_hidden, gk, W3t);
      at::threshold_backward_out(g, g, h2s[i], 0);
      at::baddbmm_out(h1, c1, zs[i], W1).relu_();
      gW2.baddbmm_(h1_t, g, 1, factor);
      at::sum_out(sums2[i], g, {-2}, true);
      g = at::bmm_out(g_first, g, W2t);
      at::threshold_backward_out(g, g, h1, 0);
      gW1.baddbmm_(zs_t[i], g, 1, factor);
      at::sum_out(sums1[i], g, {-2}, true);
      const Tensor g_input = at::bmm(g, W1t);
      for (const auto& [j, coef] : a[stage]) {
        if (!g_stage[j]) {
          g_stage[j] = std::make_pair(g_input.mul(coef * factor), 1.0);
        } else {
          g_stage[j]->first.add_(g_input, coef * factor);
        }
      }
      gz.add_(g_input, factor);
    }
  }
  return gz;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_loop", &forward_loop, "forward loop of tune_node.dense_solve");
  m.def("backward_loop", &backward_loop, "backward loop of tune_node.dense_solve");
}
