"""Where distillation training sequences come from (DistillSpec Alg. A.2) and SKD interleaved sampling."""
