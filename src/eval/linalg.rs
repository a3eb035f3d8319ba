//! Dense f64 linear algebra for the closed-form baselines (CCA): row-major square or
//! rectangular matrices in plain `Vec<f64>`. Small on purpose: Cholesky, triangular solves
//! and a symmetric eigensolver are all CCA needs, and a LAPACK binding would be the largest
//! dependency of the crate for a baseline.

use crate::{Error, Result};

/// `c = a · b` with a `[m, k]`, b `[k, n]` (f64, through matrixmultiply's dgemm).
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    gemm_into(a, false, b, false, m, k, n, &mut c);
    c
}

/// `c = op(a) · op(b)`; op(a) `[m, k]` (stored `[k, m]` when `ta`), op(b) `[k, n]` (stored
/// `[n, k]` when `tb`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_into(a: &[f64], ta: bool, b: &[f64], tb: bool, m: usize, k: usize, n: usize, c: &mut [f64]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matrix shapes");
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the assertion above bounds every element the strides address.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// Cholesky factor of a symmetric positive-definite `[n, n]` matrix, in place: on return the
/// lower triangle holds L with `a = L·Lᵀ` and the strict upper triangle is zero.
pub fn cholesky(a: &mut [f64], n: usize, what: &str) -> Result<()> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return Err(Error::data(format!(
                "{what} is not positive definite (pivot {j} is {d:e}); raise the regularisation"
            )));
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
        for i in 0..j {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// Solves `L · X = B` for X in place of b (`[n, cols]`), L lower-triangular `[n, n]`.
pub fn solve_lower(l: &[f64], n: usize, b: &mut [f64], cols: usize) {
    for i in 0..n {
        for k in 0..i {
            let lik = l[i * n + k];
            if lik != 0.0 {
                for c in 0..cols {
                    b[i * cols + c] -= lik * b[k * cols + c];
                }
            }
        }
        let d = l[i * n + i];
        for c in 0..cols {
            b[i * cols + c] /= d;
        }
    }
}

/// Solves `Lᵀ · X = B` for X in place of b (`[n, cols]`), L lower-triangular `[n, n]`.
pub fn solve_lower_transposed(l: &[f64], n: usize, b: &mut [f64], cols: usize) {
    for i in (0..n).rev() {
        for k in i + 1..n {
            let lki = l[k * n + i];
            if lki != 0.0 {
                for c in 0..cols {
                    b[i * cols + c] -= lki * b[k * cols + c];
                }
            }
        }
        let d = l[i * n + i];
        for c in 0..cols {
            b[i * cols + c] /= d;
        }
    }
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// Eigen-decomposition of a symmetric `[n, n]` matrix by cyclic Jacobi rotations: returns the
/// eigenvalues in descending order and the eigenvectors as the COLUMNS of a `[n, n]` matrix.
/// Jacobi is slower than tridiagonal QL but accurate to working precision for every
/// eigenvalue, and a few hundred dimensions (CCA's smaller side) take well under a second.
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * total || total == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Golub & Van Loan, Alg. 8.4.2).
                let tau = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = tau.signum() / (tau.abs() + (1.0 + tau * tau).sqrt());
                let t = if tau == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + col] = v[k * n + i];
        }
    }
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn cholesky_of_a_hand_computed_matrix() {
        // [[4, 2], [2, 3]] = L·Lᵀ with L = [[2, 0], [1, √2]].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        cholesky(&mut a, 2, "test").unwrap();
        assert!(close(&a, &[2.0, 0.0, 1.0, 2f64.sqrt()], 1e-15), "{a:?}");
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        let err = cholesky(&mut singular, 2, "C_xx").unwrap_err().to_string();
        assert!(err.contains("C_xx") && err.contains("positive definite"), "{err}");
    }

    #[test]
    fn triangular_solves_invert_the_factor() {
        let l = vec![2.0, 0.0, 0.0, 1.0, 3.0, 0.0, -1.0, 0.5, 4.0];
        let b = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut x = b.clone();
        solve_lower(&l, 3, &mut x, 2);
        assert!(close(&matmul(&l, &x, 3, 3, 2), &b, 1e-12));
        let mut y = b.clone();
        solve_lower_transposed(&l, 3, &mut y, 2);
        assert!(close(&matmul(&transpose(&l, 3, 3), &y, 3, 3, 2), &b, 1e-12));
    }

    #[test]
    fn eigen_of_hand_computed_and_random_symmetric_matrices() {
        // [[2, 1], [1, 2]]: eigenvalues 3 and 1, eigenvectors (1, 1)/√2 and (1, −1)/√2.
        let (vals, vecs) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!(close(&vals, &[3.0, 1.0], 1e-14), "{vals:?}");
        let h = 0.5f64.sqrt();
        assert!((vecs[0].abs() - h).abs() < 1e-14 && (vecs[2].abs() - h).abs() < 1e-14);
        assert!(vecs[0] * vecs[2] > 0.0, "first eigenvector is (1, 1)/√2 up to sign");

        let n = 23;
        let mut rng = crate::rng::Rng::new(5);
        let g: Vec<f64> = (0..n * n).map(|_| rng.normal()).collect();
        let a = matmul(&g, &transpose(&g, n, n), n, n, n); // symmetric PSD
        let (vals, v) = symmetric_eigen(&a, n);
        assert!(vals.windows(2).all(|w| w[0] >= w[1]), "descending");
        // A·V = V·Λ and VᵀV = I.
        let av = matmul(&a, &v, n, n, n);
        let scale = vals[0];
        for i in 0..n {
            for j in 0..n {
                assert!((av[i * n + j] - v[i * n + j] * vals[j]).abs() < 1e-10 * scale, "A·V ≠ V·Λ at ({i}, {j})");
            }
        }
        let vtv = matmul(&transpose(&v, n, n), &v, n, n, n);
        for i in 0..n {
            for j in 0..n {
                assert!((vtv[i * n + j] - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }
}
