"""Analysis tools: the gradient-geometry probe (angles between the terms' gradients by VDS bin)."""
from vgs_kernels.analysis.probe import GeometryRow, gradient_geometry, plot_gradient_geometry

__all__ = ["GeometryRow", "gradient_geometry", "plot_gradient_geometry"]
