"""Lazy TensorFlow import: `import vqgan_jax` must not pay TF's multi-second import."""

_TF = None


def tf():
    """Returns the `tensorflow` module, hiding every GPU from it the first time.

    tf.data only needs the host CPUs; if TF saw the accelerators it would reserve their memory and JAX
    would fail to allocate.
    """
    global _TF
    if _TF is None:
        import tensorflow

        try:
            tensorflow.config.set_visible_devices([], "GPU")
        except RuntimeError:
            # TF's runtime was already initialised by someone else; whoever did so chose the devices.
            pass
        _TF = tensorflow
    return _TF


def graph_fn(fn):
    """Marks a tf.data function as plain graph code: it uses tf.cond, never Python control flow on tensors,
    so AutoGraph's source rewriting (a sizeable share of building a pipeline) is wasted work."""
    return tf().autograph.experimental.do_not_convert(fn)
