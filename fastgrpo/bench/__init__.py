"""Benchmarks (``fastgrpo-bench``): rollout throughput by mode and batch size, draft drift, and
end-to-end GRPO step time. They print figures and write JSON + PNG; tests never time anything."""
