import CTENGraDHeader
import TENGraD

// Thunks: the handle-free data-parallel helpers (statuses only: no handle holds a message).

@_cdecl("tengrad_assign_owners")
public func tengrad_assign_owners(
    _ costs: UnsafePointer<Int64>?, _ layers: Int32, _ ranks: Int32, _ outOwners: UnsafeMutablePointer<Int32>?
) -> Int32 {
    guard layers >= 0, let outOwners, layers == 0 || costs != nil else { return statusInvalid }
    let given = layers == 0 ? [] : Array(UnsafeBufferPointer(start: costs, count: Int(layers)))
    guard let owners = try? DataParallel.owners(costs: given, ranks: Int(ranks)) else { return statusInvalid }
    for (i, owner) in owners.enumerated() { outOwners[i] = Int32(owner) }
    return tengrad_status(TENGRAD_OK)
}

@_cdecl("tengrad_kl_clip_from_sum")
public func tengrad_kl_clip_from_sum(
    _ learningRate: Double, _ klClip: Double, _ sum: Double, _ outNu: UnsafeMutablePointer<Double>?
) -> Int32 {
    guard let outNu, let nu = try? DataParallel.klClipFactor(learningRate: learningRate, klClip: klClip, sum: sum) else {
        return statusInvalid
    }
    outNu.pointee = nu
    return tengrad_status(TENGRAD_OK)
}
