// TENGraD from Swift: softmax regression (one linear layer, 784 → 10) on Fashion-MNIST, trained
// with exact natural-gradient steps through `import TENGraD`, next to plain SGD.
//
//   swift run -c release tengrad-swift-example build/data [epochs]
//
// The directory holds the uncompressed IDX files (`make build/data/.done` unpacks them from
// Debian's dataset-fashion-mnist).
import TENGraD

#if canImport(Glibc)
import Glibc
#endif

struct Dataset {
    var images: [Float]  // [n][784], normalized
    var labels: [Int]
    var count: Int { labels.count }
}

func readFile(_ path: String) -> [UInt8]? {
    guard let f = fopen(path, "rb") else { return nil }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = fread(&chunk, 1, chunk.count, f)
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    return bytes
}

func load(_ dir: String, _ prefix: String, limit: Int) -> Dataset? {
    guard let img = readFile("\(dir)/\(prefix)-images-idx3-ubyte"), let lab = readFile("\(dir)/\(prefix)-labels-idx1-ubyte"),
          img.count > 16, lab.count > 8
    else { return nil }
    let n = min(limit, (img.count - 16) / 784, lab.count - 8)
    let images = (0..<(n * 784)).map { (Float(img[16 + $0]) / 255 - 0.2860) / 0.3530 }
    return Dataset(images: images, labels: (0..<n).map { Int(lab[8 + $0]) })
}

/// Logits [m][10] of a batch, then (mean loss, d loss/d logits with mean reduction).
func lossAndGrad(_ w: [Float], _ b: [Float], _ x: ArraySlice<Float>, _ y: ArraySlice<Int>) -> (Double, [Float]) {
    let m = y.count
    var grad = [Float](repeating: 0, count: m * 10)
    var loss = 0.0
    for i in 0..<m {
        var z = [Double](repeating: 0, count: 10)
        for k in 0..<10 {
            var s = Double(b[k])
            for j in 0..<784 { s += Double(w[k * 784 + j]) * Double(x[x.startIndex + i * 784 + j]) }
            z[k] = s
        }
        let top = z.max() ?? 0
        let sum = z.reduce(0) { $0 + exp($1 - top) }
        let label = y[y.startIndex + i]
        loss += log(sum) - (z[label] - top)
        for k in 0..<10 { grad[i * 10 + k] = Float((exp(z[k] - top) / sum - (k == label ? 1 : 0)) / Double(m)) }
    }
    return (loss / Double(m), grad)
}

func accuracy(_ w: [Float], _ b: [Float], _ d: Dataset) -> Double {
    var correct = 0
    for i in 0..<d.count {
        var best = 0, bestZ = -Float.infinity
        for k in 0..<10 {
            var s = b[k]
            for j in 0..<784 { s += w[k * 784 + j] * d.images[i * 784 + j] }
            if s > bestZ { bestZ = s; best = k }
        }
        correct += best == d.labels[i] ? 1 : 0
    }
    return Double(correct) / Double(d.count)
}

let args = CommandLine.arguments
let dir = args.count > 1 ? args[1] : "build/data"
let epochs = args.count > 2 ? Int(args[2]) ?? 2 : 2
guard let train = load(dir, "train", limit: 10000), let test = load(dir, "t10k", limit: 2000) else {
    print("cannot read Fashion-MNIST IDX files in \(dir) (run `make build/data/.done`)")
    exit(1)
}
let batch = 100

for natural in [true, false] {
    var w = [Float](repeating: 0, count: 10 * 784), b = [Float](repeating: 0, count: 10)
    let p = Preconditioner()
    do {
        try p.setDamping(1.0)
        let layer = try p.addLinear(inFeatures: 784, outFeatures: 10, bias: true)
        for epoch in 1...epochs {
            var total = 0.0
            for s in stride(from: 0, to: train.count - batch + 1, by: batch) {
                let x = train.images[(s * 784)..<((s + batch) * 784)]
                let (loss, g) = lossAndGrad(w, b, x, train.labels[s..<(s + batch)])
                total += loss
                if natural {
                    // Mean-reduced loss: grad_scale = batch.
                    let (dw, db) = try p.naturalGradient(layer: layer, batch: batch, activations: Array(x), outputGrads: g, gradScale: Float(batch))
                    for k in 0..<w.count { w[k] -= 0.2 * dw[k] }
                    for k in 0..<10 { b[k] -= 0.2 * (db?[k] ?? 0) }
                } else {
                    for i in 0..<batch {
                        for k in 0..<10 {
                            let gk = 0.01 * g[i * 10 + k]  // SGD learning rate 0.01
                            b[k] -= gk
                            for j in 0..<784 { w[k * 784 + j] -= gk * x[x.startIndex + i * 784 + j] }
                        }
                    }
                }
            }
            let name = natural ? "TENGraD" : "SGD"
            print("\(name) epoch \(epoch): train loss \(total / Double(train.count / batch)), test accuracy \(accuracy(w, b, test))")
        }
    } catch {
        print("TENGraD error: \(error)")
        exit(1)
    }
}
