"""Chain-of-thought distillation: a teacher writes reasoning traces, checks keep the good ones in
the target language, and the student learns them by sequence- and token-level distillation."""
