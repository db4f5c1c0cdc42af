"""Operations: access log, metrics, health."""
