"""Information-theoretic channel scoring: matrix-based Rényi α-entropy estimators (:mod:`.mutual_info`)."""
