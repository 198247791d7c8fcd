"""Information-theoretic channel scoring: Gram matrices (:mod:`.kernels`) and the matrix-based Rényi α-entropy
estimators built on them (:mod:`.mutual_info`)."""
