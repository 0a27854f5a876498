// Every csfrn op schema, in one place. ops.cpp defines them in namespace csfrn (kernels register per backend in
// cpu/*.cpp and cuda/*.cu; fake kernels and autograd live in Python, csfrn/ops/); the test-only CUDA emulation
// (csrc/emu/) defines the same list in namespace csfrn_emu.
#pragma once

namespace csfrn {

inline constexpr const char* kOpSchemas[] = {
    // Class-wise average pooling: per image, the mean feature vector of every class, and the pixel counts in the
    // accumulation type (float32 for half and bfloat16: exact, for the backward; csfrn.ops.class_avg_pool returns
    // them in the features' dtype). The backward takes counts of any real dtype and divides in the accumulation type.
    // validate: a label outside [0, num_classes) that is not ignore_index is an error (on CUDA: one device-to-host
    // sync); without it such pixels are ignored like ignore_index (no sync; nothing is read or written for them).
    "class_avg_pool(Tensor features, Tensor labels, int num_classes, int ignore_index, bool validate=True) "
    "-> (Tensor, Tensor)",
    "class_avg_pool_backward(Tensor grad_means, Tensor labels, Tensor counts, int ignore_index) -> Tensor",

    // Gaussian centre distance with class-aware margins: phi = 1 - exp(-||b - s_k||^2 * exp(delta * m_k)).
    "center_distance(Tensor embeddings, Tensor centers, Tensor margins, float delta) -> Tensor",
    // Gradients not asked for in output_mask come back as empty tensors.
    "center_distance_backward(Tensor grad_phi, Tensor embeddings, Tensor centers, Tensor margins, float delta, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",

    // ---- Deformable convolution (torchvision.ops.deform_conv2d semantics; DCN v2 when a mask is given) ----
    // groups = input.size(1) / weight.size(1); offset_groups = offset.size(1) / (2 * kh * kw).
    "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, int[2] stride, "
    "int[2] padding, int[2] dilation) -> Tensor",
    // Gradients of (input, offset, weight, bias, mask); those not asked for in output_mask come back empty.
    "deform_conv2d_backward(Tensor grad_out, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
    "int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    // AAM's pair: two deformable convolutions on one offset field (and mask), sampled once.
    "dual_deform_conv2d(Tensor x, Tensor y, Tensor offset, Tensor weight_x, Tensor weight_y, Tensor? bias_x, "
    "Tensor? bias_y, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor)",
    // Gradients of (x, y, offset, weight_x, weight_y, bias_x, bias_y, mask), as above.
    "dual_deform_conv2d_backward(Tensor grad_out_x, Tensor grad_out_y, Tensor x, Tensor y, Tensor offset, "
    "Tensor weight_x, Tensor weight_y, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, "
    "bool[8] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
};

}  // namespace csfrn
