// Dense fp64 linear algebra the Hessian-based quantizers need: Cholesky and
// the upper Cholesky factor of an inverse, plus runtime-dispatched axpy.
//
// Goals: correct, cache-blocked, multi-threaded over an optional ThreadPool,
// fast enough for 1536 x 1536 Hessians in well under a second.
// Non-goals: a general BLAS/LAPACK; pivoting (inputs are damped SPD matrices).
//
// Matrices are n x n, row-major, contiguous. Thread safety: functions are
// reentrant; each call may run up to n_threads threads (<= 0: all cores).
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

// y[0..n) += a * x[0..n)  (AVX-512/AVX2/SSE clones picked at run time).
void Axpy(double* y, double a, const double* x, int64_t n);
void Axpy(float* y, float a, const float* x, int64_t n);

// In place: the upper triangle of `a` becomes U with A = U^T U (the strict
// lower triangle is set to zero); only the upper triangle of A is read.
// Returns false (a partly overwritten) if A is not numerically positive
// definite: a pivot <= 0 or not finite.
bool CholeskyUpper(double* a, int64_t n, int n_threads);

// Inverse of an upper-triangular U with nonzero diagonal, written to
// `out` (n x n, upper; strict lower triangle zero). REQUIRES: out != u.
void InvertUpper(const double* u, int64_t n, double* out, int n_threads);

// The upper-triangular U with A^-1 = U^T U (positive diagonal), computed as
// J V^-T J where J is the reversal and (J A J) = V^T V, which avoids forming
// A^-1. `a` (symmetric, full) is consumed. Returns false if A is not SPD.
bool InverseCholeskyUpper(std::vector<double>& a, int64_t n, std::vector<double>* u, int n_threads);

}  // namespace nibble
