import CTENGraDHeader
import TENGraD

// Thunks: KL clipping, layer statistics and snapshot information.

// MARK: - KL clipping and diagnostics

@_cdecl("tengrad_clear_updates")
public func tengrad_clear_updates(_ p: OpaquePointer?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in h.core.clearUpdates() }
}

@_cdecl("tengrad_kl_clip_factor")
public func tengrad_kl_clip_factor(
    _ p: OpaquePointer?, _ learningRate: Double, _ klClip: Double, _ outNu: UnsafeMutablePointer<Double>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let out = try required(outNu, "out_nu")
        out.pointee = try h.core.klClipFactor(learningRate: learningRate, klClip: klClip)
    }
}

@_cdecl("tengrad_get_layer_stats")
public func tengrad_get_layer_stats(
    _ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<tengrad_layer_stats>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let s = try h.core.stats(layer: Int(layer))
        var c = tengrad_layer_stats()
        c.size = MemoryLayout<tengrad_layer_stats>.size
        c.kind = s.kind.code
        c.conv_strategy = s.convStrategy.code
        c.batch = Int64(s.batch)
        c.parameters = Int64(s.parameters)
        c.snapshot_bytes = Int64(s.snapshotBytes)
        c.workspace_bytes = Int64(s.workspaceBytes)
        c.damping = s.damping
        c.jitter = s.jitter
        c.rcond = s.rcond
        c.curvature_flops = s.curvatureFlops
        c.curvature_seconds = s.curvatureSeconds
        c.update_flops = s.updateFlops
        c.update_seconds = s.updateSeconds
        c.update_dot_grad = s.updateDotGrad
        c.conv_factored_flops = s.factoredFlopsEstimate
        c.conv_explicit_flops = s.explicitFlopsEstimate
        try writeCallerStruct(c, to: out, "out", type: "tengrad_layer_stats")
    }
}

@_cdecl("tengrad_get_snapshot_info")
public func tengrad_get_snapshot_info(
    _ p: OpaquePointer?, _ layer: Int32, _ info: UnsafeMutablePointer<tengrad_snapshot_info>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        _ = try required(info, "info")
        let s = try h.core.stats(layer: Int(layer))
        var c = tengrad_snapshot_info()
        c.size = MemoryLayout<tengrad_snapshot_info>.size
        c.representation = s.representation.code
        c.representation_setting = try h.core.snapshotRepresentation(layer: Int(layer)).code
        c.batch = Int64(s.batch)
        c.representation_bytes = Int64(s.representationBytes)
        c.snapshot_bytes = Int64(s.snapshotBytes)
        c.raw_bytes = s.rawBytesEstimate
        c.per_sample_bytes = s.perSampleBytesEstimate
        c.raw_reuse_cost = s.rawReuseCost
        c.per_sample_reuse_cost = s.perSampleReuseCost
        try writeCallerStruct(c, to: info, "info", type: "tengrad_snapshot_info")
    }
}
