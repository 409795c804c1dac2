"""How a budget is met, one module per way: a parameter or FLOP budget behind the speed guard
(:mod:`.guarded`), the latency closed loop (:mod:`.latency_loop`) with its second route
(:mod:`.second_route`), and the output-error search (:mod:`.error_search`).  Each keeps its state
in a dataclass and runs the stages of :mod:`onnx_alds.pipeline`; none reads a report to decide."""
