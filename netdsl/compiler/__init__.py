"""The compiler: the pass pipeline over the layer graph, then emission of kernels, plan and report."""
