"""Dense float64 oracle for conv2d: per-sample gradients by explicit im2col loops (independent of
the library's unfolding), then F + λI formed and solved densely."""
import numpy as np


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_per_sample(x, g, spec, scale):
    """U with one column per sample: u_i = s · [W-gradient | bias-gradient] of sample i, flattened
    per output channel as [weight row (C_in/groups·kh·kw) | bias], channel by channel."""
    m, cin, h, w = x.shape
    cout = g.shape[1]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec["kernel"], spec["stride"], spec["padding"], spec["dilation"]
    groups, bias = spec["groups"], spec["bias"]
    cgi, cgo = cin // groups, cout // groups
    ho, wo = g.shape[2], g.shape[3]
    xp = np.zeros((m, cin, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + w] = x
    cols = []
    for i in range(m):
        grad_w = np.zeros((cout, cgi, kh, kw))
        for o in range(cout):
            grp = o // cgo
            for c in range(cgi):
                for ki in range(kh):
                    for kj in range(kw):
                        patch = xp[i, grp * cgi + c, ki * dh: ki * dh + sh * (ho - 1) + 1: sh,
                                   kj * dw: kj * dw + sw * (wo - 1) + 1: sw]
                        grad_w[o, c, ki, kj] = np.sum(g[i, o] * patch)
        rows = grad_w.reshape(cout, -1)
        if bias:
            rows = np.hstack([rows, g[i].reshape(cout, -1).sum(axis=1, keepdims=True)])
        cols.append(scale * rows.ravel())
    return np.stack(cols, axis=1)


def join_conv(weight, bias):
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    if bias is not None:
        rows = np.hstack([rows, np.asarray(bias, np.float64)[:, None]])
    return rows.ravel()
